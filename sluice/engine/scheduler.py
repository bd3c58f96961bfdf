"""Decides, each step, which requests run and how many of their tokens. Plain Python, no torch.

One rule, as in vLLM v1: a request's computed tokens catch up toward its total tokens under a
per-step token budget. A prefill chunk, a decode and a recompute after preemption are all the
same rule. Running requests go first (oldest first); when pages run out the newest running
request is preempted (its pages freed, recomputed later) so the older ones can go on.

Hybrid models: a request is admitted only when it gets both its pages and a state slot, and
preemption gives back both.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sluice.config import SchedulerConfig
from sluice.engine.cache_manager import KVCacheManager
from sluice.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute, per request
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        if request.num_tokens > self.kv.capacity_tokens:
            raise ValueError(
                f"request {request.request_id} needs {request.num_tokens} tokens of KV cache, "
                f"the pool holds {self.kv.capacity_tokens}"
            )
        self.waiting.append(request)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if not batch.preempted:
            self._admit_waiting(batch, budget)
        return batch

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its pages."""
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = self._chunk_size(request, budget)
            if not self._make_room(request, num_tokens, batch):
                break  # the request itself was preempted: nothing newer is left to run
            self.kv.allocate(request, num_tokens)
            batch.add(request, num_tokens)
            budget -= num_tokens
            index += 1
        return budget

    def _chunk_size(self, request: Request, budget: int) -> int:
        return self.kv.align_chunk(request, min(request.num_pending_tokens, budget))

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

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            self.kv.match_prefix(request)
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
