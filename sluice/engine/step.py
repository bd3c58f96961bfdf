"""What crosses from the scheduler to the model and back each step: plain data, no torch.

`StepInput` names every request's tokens to compute, where they go in the cache and which rows
sample; `StepOutput` the tokens sampled per request. Nothing here refers to a live `Request`, so
an executor may hand a step to another thread or process (pickle it) without touching the
scheduler. Per-request state an executor keeps across steps is keyed by request id and dropped
when the id appears in `finished_ids` (a seeded request's draws need none: they are seeded by
its seed and the output position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.engine.request import TokenLogprob
from sluice.engine.state_pool import StateOp
from sluice.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """How a request samples this step; the token history feeds repetition penalties."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step. `token_ids` are computed at positions `context_len`,
    `context_len + 1`, ...; the last `num_speculative` of them are draft tokens to verify.
    When `sampling` is set, the last `num_speculative + 1` rows sample (the last token's
    continuation and each draft's check); otherwise the chunk only fills the cache."""

    request_id: str
    token_ids: list[int]
    context_len: int
    page_ids: list[int]
    state_slot: int | None = None
    num_speculative: int = 0
    sampling: SamplingRow | None = None
    # Prompt logprobs: the prompt tokens that follow this chunk's first rows, one per row, and
    # how many alternatives each wants.
    prompt_targets: list[int] = field(default_factory=list)
    num_prompt_alternatives: int = 0
    # Hybrid models, a verify run: the slots that take the state after each token of the run
    # but the last (which goes to `state_slot`), so that any accepted length can be committed.
    verify_state_slots: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_sample_rows(self) -> int:
        return 0 if self.sampling is None else self.num_speculative + 1


@dataclass(frozen=True)
class StepInput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    state_ops: list[StateOp] = field(default_factory=list)  # apply in order before the forward
    finished_ids: list[str] = field(default_factory=list)  # drop their model-side state


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class StepOutput:
    """The tokens sampled for each request that had sample rows, in row order."""

    sampled: dict[str, list[SampledToken]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
