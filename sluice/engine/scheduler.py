"""Decides, each step, which requests run and how many of their tokens, and applies what the
model sampled. Plain Python, no torch.

One rule, as in vLLM v1: a request's computed tokens catch up toward its total tokens under a
per-step token budget. A prefill chunk, a decode, the verification of draft tokens and a
recompute after preemption are all the same rule. Running requests go first (oldest first);
when pages run out the newest running request is preempted (its pages freed, recomputed later)
so the older ones can go on.

A step is `schedule()` -> the model -> `update()`. Only `update` advances a request: by the
tokens the model's samples confirmed (a rejected draft token is not computed), then it appends
the sampled tokens, runs the token-level stop checks and only then offers full pages to the
prefix cache, so nothing uncommitted is ever cached.

Hybrid models: a request is admitted only when it gets both its pages and a state slot, and
preemption gives back both. Their recurrent state cannot be rolled back, so a verify step also
borrows a slot per draft, where its run leaves the state after each token; `update` keeps the one
after the accepted drafts (`KVCacheManager.commit_verified_state`) and gives back the others.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sluice.config import SchedulerConfig
from sluice.engine.cache_manager import KVCacheManager
from sluice.engine.request import FinishReason, HeldKV, Request, RequestStatus, TokenLogprob
from sluice.engine.step import SampledToken, SamplingRow, ScheduledRequest, StepInput, StepOutput
from sluice.spec.stats import SpecStats


@dataclass
class ScheduledBatch:
    """The scheduler's record of one step: the live requests behind its plain-data input."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute, per request
    num_speculative: list[int] = field(default_factory=list)  # of which draft tokens
    preempted: list[Request] = field(default_factory=list)
    step: StepInput = field(default_factory=StepInput)

    def add(self, request: Request, num_tokens: int, num_speculative: int = 0) -> None:
        self.requests.append(request)
        self.num_tokens.append(num_tokens)
        self.num_speculative.append(num_speculative)


@dataclass
class RequestUpdate:
    """What one step did for one request: its new tokens and, if it ended, why."""

    request: Request
    new_token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None = None


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Admitted with their pages, waiting for their prompt's KV from another engine.
        self.pulling: list[Request] = []
        self.num_preemptions = 0
        self.spec_stats = SpecStats()
        self._finished_ids: list[str] = []  # since the last step: the model drops their state

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.pulling)

    def add(self, request: Request) -> None:
        if request.num_tokens > self.kv.capacity_tokens:
            raise ValueError(
                f"request {request.request_id} needs {request.num_tokens} tokens of KV cache, "
                f"the pool holds {self.kv.capacity_tokens}"
            )
        self.waiting.append(request)

    def add_prefilled(self, request: Request, first_token: int) -> FinishReason | None:
        """Queue a request whose prompt another engine computed (prefill/decode disaggregation)
        with the token that engine sampled; if that token already ends it, finish it instead
        and say why."""
        self.add(request)
        return self.prefilled(request, first_token)

    def prefilled(self, request: Request, first_token: int) -> FinishReason | None:
        """Give a queued or admitted request the first token another engine sampled; finish
        it when that token ends it, and say why."""
        request.output_token_ids.append(first_token)
        reason = self._stop_reason(request, first_token)
        if reason is not None:
            self.finish(request, reason)
        return reason

    def pulled(self, request: Request, ok: bool) -> None:
        """The pull of a request's prompt KV ended (or never started): with the KV in its pages
        it goes on from the prompt's end; without (`ok` False) it goes back to the queue's
        front to be computed here, from the prefix cache, as after a preemption (or to be
        failed by the engine: `--pd-on-transfer-failure error`)."""
        self.pulling.remove(request)
        request.remote_prefill = request.pending_prefill = None
        if not ok:
            self._release(request)
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
            return
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_computed(request)
        self.running.append(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if not batch.preempted:
            self._admit_waiting(batch, budget)
        batch.step = self._step_input(batch)
        return batch

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request wherever it is (done, stopped or aborted) and free its pages."""
        request.finish_reason = reason
        request.status = RequestStatus.FINISHED
        pulling = request in self.pulling
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif pulling:
            self.pulling.remove(request)
        request.spec_token_ids = []
        # A prefill whose decode runs elsewhere keeps its KV for the reader; so does a request
        # whose own pull still writes into its pages.
        if (request.keep_kv and reason != FinishReason.ABORT) or pulling:
            request.held = HeldKV(self.kv.hold(request), self.kv.detach_state(request))
        self.kv.free(request)
        self._finished_ids.append(request.request_id)

    def cut_output(self, request: Request, num_output_tokens: int) -> None:
        """Drop the output past its first `num_output_tokens` tokens (a stop string ended the
        text inside a run of accepted drafts), so usage and the cache see only what is kept."""
        del request.output_token_ids[num_output_tokens:]
        if request.num_computed_tokens >= request.num_tokens:
            request.num_computed_tokens = request.num_tokens - 1
            self.kv.drop_state(request)  # a hybrid's state holds the tokens cut: never cache it

    # ---- after the model ran ---------------------------------------------------------------

    def update(self, batch: ScheduledBatch, output: StepOutput) -> list[RequestUpdate]:
        """Apply one step's samples: advance each request by what was accepted, give back the
        pages of rejected drafts, append the new tokens with the token-level stop checks, and
        cache the full pages of what is committed."""
        updates = []
        for scheduled, request in zip(batch.step.requests, batch.requests):
            sampled = output.sampled.get(scheduled.request_id, [])
            _record_prompt_logprobs(request, scheduled, output)
            accepted = _num_accepted(scheduled, sampled)
            request.num_computed_tokens += scheduled.num_tokens - scheduled.num_speculative
            request.num_computed_tokens += accepted
            request.spec_token_ids = []
            if scheduled.num_speculative:
                self.spec_stats.record(scheduled.num_speculative, accepted)
                request.draft_acceptance.record(scheduled.num_speculative, accepted)
            if scheduled.num_speculative > accepted:
                self.kv.trim(request)
            if not sampled:
                self.kv.cache_computed(request)
                continue
            update = self._append(request, sampled[: accepted + 1])
            if request.verify_state_slots:
                self.kv.commit_verified_state(request, scheduled.context_len)
            if update.finish_reason is None:
                self.kv.cache_computed(request)
            else:
                self.finish(request, update.finish_reason)
            updates.append(update)
        return updates

    def _append(self, request: Request, sampled: list[SampledToken]) -> RequestUpdate:
        """Append the sampled tokens up to the first that stops the request."""
        update = RequestUpdate(request, [], [])
        for token in sampled:
            request.output_token_ids.append(token.token_id)
            update.new_token_ids.append(token.token_id)
            if token.logprob is not None:
                update.logprobs.append(token.logprob)
            update.finish_reason = self._stop_reason(request, token.token_id)
            if update.finish_reason is not None:
                break
        # A draft accepted past a stop was computed but is not part of the sequence.
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        return update

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return FinishReason.STOP
        if (
            len(request.output_token_ids) >= params.max_tokens
            or request.num_tokens >= request.max_total_tokens
        ):
            return FinishReason.LENGTH
        return None

    # ---- what runs ---------------------------------------------------------------------------

    def _step_input(self, batch: ScheduledBatch) -> StepInput:
        requests = [
            _scheduled_request(request, n, spec)
            for request, n, spec in zip(batch.requests, batch.num_tokens, batch.num_speculative)
        ]
        state_ops = self.kv.state_pool.take_ops() if self.kv.state_pool is not None else []
        finished, self._finished_ids = self._finished_ids, []
        return StepInput(requests, state_ops, finished)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = self._chunk_size(request, budget)
            num_drafts = self.kv.acquire_verify_states(
                request, self._num_drafts(request, num_tokens, budget), len(self.waiting)
            )
            num_tokens += num_drafts
            if not self._make_room(request, num_tokens, batch):
                break  # the request itself was preempted: nothing newer is left to run
            self.kv.allocate(request, num_tokens)
            batch.add(request, num_tokens, num_drafts)
            budget -= num_tokens
            index += 1
        return budget

    def _chunk_size(self, request: Request, budget: int) -> int:
        return self.kv.align_chunk(request, min(request.num_pending_tokens, budget))

    def _num_drafts(self, request: Request, num_tokens: int, budget: int) -> int:
        """Draft tokens to verify beside a request's last token: only once it has caught up,
        within the budget, and never more than could be kept (all accepted, plus the token
        sampled after them, must fit max_tokens and the context)."""
        if num_tokens != request.num_pending_tokens:
            return 0
        room = min(
            request.params.max_tokens - len(request.output_token_ids),
            request.max_total_tokens - request.num_tokens,
        )
        return max(0, min(len(request.spec_token_ids), budget - num_tokens, room - 1))

    def _make_room(self, request: Request, num_tokens: int, batch: ScheduledBatch) -> bool:
        while not self.kv.can_allocate(request, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.num_preemptions += 1
        self._release(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        """Free the request's pages; it starts over (from the prefix cache) when next admitted."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and self._num_admitted < self.config.max_num_seqs:
            request = self.waiting[0]
            self.kv.match_prefix(request)
            if request.pulls_prompt:
                if not self._admit_pull(request):
                    break
                continue
            num_tokens = self._chunk_size(request, budget)
            if not self.kv.can_allocate(request, num_tokens) or not self.kv.acquire_state(request):
                self._release(request)
                break
            self.waiting.popleft()
            self.kv.allocate(request, num_tokens)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # not again when re-admitted after preemption
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            batch.add(request, num_tokens)
            budget -= num_tokens

    @property
    def _num_admitted(self) -> int:
        return len(self.running) + len(self.pulling)

    def _admit_pull(self, request: Request) -> bool:
        """Admit a request whose prompt KV comes from another engine: pages for all of the
        prompt (the prefix cache's hit included) and an unfilled state slot, no compute."""
        missing = request.num_prompt_tokens - request.num_computed_tokens
        if not self.kv.can_allocate(request, missing) or not self.kv.acquire_state(
            request, fill=False
        ):
            self._release(request)
            return False
        self.waiting.popleft()
        self.kv.allocate(request, missing)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self.pulling.append(request)
        return True


def _scheduled_request(request: Request, num_tokens: int, num_drafts: int) -> ScheduledRequest:
    """The plain-data view of a request's part of the step. Its lists are the request's own
    (no copies on the hot path): an executor that runs the step later must copy them."""
    start = request.num_computed_tokens
    end = start + num_tokens - num_drafts
    token_ids = request.token_ids(start, end) + request.spec_token_ids[:num_drafts]
    sampling = None
    if end == request.num_tokens:
        sampling = SamplingRow(request.params, request.prompt_token_ids, request.output_token_ids)
    wanted = request.params.prompt_logprobs
    return ScheduledRequest(
        request.request_id,
        token_ids,
        start,
        request.page_ids,
        request.state_slot,
        num_drafts,
        sampling,
        request.prompt_token_ids[start + 1 : end + 1] if wanted is not None else [],
        wanted or 0,
        request.verify_state_slots,
    )


def _record_prompt_logprobs(
    request: Request, scheduled: ScheduledRequest, output: StepOutput
) -> None:
    """Keep the chunk's prompt logprobs; a chunk computed again after a preemption adds none."""
    new = output.prompt_logprobs.get(scheduled.request_id, [])
    num_known = len(request.prompt_logprobs) - scheduled.context_len
    request.prompt_logprobs.extend(new[max(0, num_known) :])


def _num_accepted(scheduled: ScheduledRequest, sampled: list[SampledToken]) -> int:
    """Drafts confirmed by the model: the leading ones equal to the token sampled before them."""
    drafts = scheduled.token_ids[scheduled.num_tokens - scheduled.num_speculative :]
    accepted = 0
    for draft, token in zip(drafts, sampled):
        if draft != token.token_id:
            break
        accepted += 1
    return accepted
