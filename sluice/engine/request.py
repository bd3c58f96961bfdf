"""A request as the scheduler sees it: tokens, how many of them are computed, and its pages."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sluice.sampling_params import SamplingParams
from sluice.spec.policy import AcceptanceEstimate

if TYPE_CHECKING:
    from sluice.disagg.params import PendingPrefill, RemotePrefill, TransferRequest
    from sluice.engine.prefix_cache import RadixNode


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the client or the server


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass(frozen=True)
class PreparedRequest:
    """A request validated and encoded at the edge (`Engine.prepare`); trusted from then on."""

    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str = ""  # prefix-cache namespace: requests with different salts share nothing
    transfer: TransferRequest | None = None  # prefill/decode disaggregation: see sluice.disagg


@dataclass(frozen=True)
class HeldKV:
    """A finished request's pages and state slot, kept from reuse while another process reads
    them (see `KVCacheManager.hold`)."""

    page_ids: list[int]
    state_slot: int | None


@dataclass(eq=False)
class Request:
    """One sequence. `num_computed_tokens` catches up with `num_tokens`, a chunk per step."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + output may not exceed this (context window, pool size)
    parent_id: str = ""  # the client's request id; `n` > 1 fans out into several Requests
    index: int = 0  # which of the parent's `n` samples this is
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    page_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # set by the scheduler when it first admits it
    # Draft tokens proposed to follow the output; the next step verifies them with the model.
    spec_token_ids: list[int] = field(default_factory=list)
    # How often its drafts were accepted: how many it proposes (spec/policy.py).
    draft_acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)
    cache_salt: str = ""  # prefix-cache namespace: requests with different salts share nothing
    prefix_node: RadixNode | None = None  # deepest prefix-cache node this request holds a lock on
    num_inserted_pages: int = 0  # leading pages of page_ids already offered to the prefix cache
    # Hybrid models: the state slot this request owns while admitted, the token count (the
    # prefix cache's branch point) at which its next chunk should end to be checkpointed there.
    state_slot: int | None = None
    checkpoint_target: int = 0
    output_checkpoint: RadixNode | None = None  # its newest checkpoint past the prompt
    # From scheduling a verify step to its update: the slots its run leaves the state in after
    # each token but the last (see `KVCacheManager.commit_verified_state`).
    verify_state_slots: list[int] = field(default_factory=list)
    # Prefill/decode disaggregation. P: keep the KV when the request ends (`held` then has it).
    # D: the prompt's KV is to be pulled from P instead of computed (until the pull ends).
    keep_kv: bool = False
    room: int | None = None  # P, driven by sglang-router: the bootstrap room D asks for
    held: HeldKV | None = None
    remote_prefill: RemotePrefill | None = None
    pending_prefill: PendingPrefill | None = None  # D: P's params, still to come (sglang-router)
    # With params.prompt_logprobs: each prompt token's after the first, filled chunk by chunk.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to first being scheduled; None while still waiting."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def pulls_prompt(self) -> bool:
        """D: its prompt's KV is to come from a prefill instance (P's params in or to come)."""
        return self.remote_prefill is not None or self.pending_prefill is not None

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        # Slices only: a decode step asks for one token and must not copy the whole context.
        prompt_len = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:end] if start < prompt_len else []
        return head + self.output_token_ids[max(0, start - prompt_len) : max(0, end - prompt_len)]
