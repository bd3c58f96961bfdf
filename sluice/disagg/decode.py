"""D's side: pull each admitted request's missing prompt pages (and its state) from P.

The scheduler admits such a request with pages for its whole prompt, its own prefix cache's hit
included, and parks it in `Scheduler.pulling`; here its pull starts (only the pages past the
hit, as page runs), is polled each step, and ends in `Scheduler.pulled`. Under sglang-router the
request is admitted before P's params exist (`PendingPrefill`): its pull starts once they come.

A pull that fails (P gone, the lease too close to expiry or past it when the pull ends, an
injected fault, P's params that never came) is, by `--pd-on-transfer-failure`, recomputed
locally from the prefix cache's hit (the request still gets its answer, later) or ends the
request with a `TransferFailedError`; either way P is told to drop the lease.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from sluice.disagg.params import PendingPrefill, RemotePrefill
from sluice.disagg.transport import KVTransport, page_runs
from sluice.engine.cache_manager import KVCacheManager
from sluice.engine.request import HeldKV, Request
from sluice.engine.scheduler import Scheduler
from sluice.sampling_params import InvalidParameterError

logger = logging.getLogger(__name__)

# Why a pull failed, as `/metrics` labels it, and as a failed request's error says it.
PULL_FAILURES = {
    "unknown_peer": "its side channel did not answer",
    "lease_expired": "its lease ran out",
    "injected": "an injected fault (--pd-inject-transfer-errors)",
    "transport": "the transfer failed",
    "no_params": "it sent no params (unreachable, or it never got the request)",
}
ON_FAILURE = ("recompute", "error")  # --pd-on-transfer-failure
# A notification goes out as the transport progresses (a new connection's first one needs a few
# rounds): D keeps polling this long after sending one, even with nothing else to do.
NOTIFY_FLUSH_S = 1.0


class TransferFailedError(RuntimeError):
    """A request's prompt KV could not be pulled and this D does not recompute it."""


@dataclass
class _Pull:
    request: Request
    prefill: RemotePrefill
    handle: object  # the transport's; None: failed before it started, for `cause`
    started: float
    num_pages: int
    num_bytes: int
    cause: str | None = None


@dataclass
class _Orphan:
    """The pull of a request that ended: its pages stay held until the transfer ends."""

    handle: object
    held: HeldKV
    prefill: RemotePrefill


@dataclass
class PullStats:
    """Totals since start, for /metrics."""

    completed: int = 0
    failed: int = 0
    pages: int = 0  # pages pulled
    bytes: int = 0
    seconds: float = 0.0  # summed over completed pulls
    cached_pages: int = 0  # prompt pages D's own prefix cache had: not pulled
    failures: dict[str, int] = field(default_factory=dict)  # by cause


@dataclass
class PullNews:
    """What the engine tells the requests' callers after a round of pulls."""

    arrived: list[Request] = field(default_factory=list)  # P's params came: the first token
    failed: list[tuple[Request, Exception]] = field(default_factory=list)  # to end in an error


class PullQueue:
    def __init__(
        self,
        transport: KVTransport,
        kv: KVCacheManager,
        scheduler: Scheduler,
        page_bytes: int,
        inject_error_rate: float = 0.0,
        lease_margin: float = 1.0,
        on_failure: str = "recompute",
    ) -> None:
        self.transport = transport
        self.kv = kv
        self.scheduler = scheduler
        self.page_bytes = page_bytes
        self.inject_error_rate = inject_error_rate
        self.lease_margin = lease_margin  # seconds a lease must still have for a pull to start
        self.on_failure = on_failure
        self._random = random.Random(0)
        self._pulls: list[_Pull] = []
        self._orphans: list[_Orphan] = []
        self._unclaimed: list[PendingPrefill] = []  # of ended requests: P's lease to drop
        self._flush_until = 0.0
        self.stats = PullStats()

    @property
    def num_in_flight(self) -> int:
        return len(self._pulls) + len(self._orphans) + len(self._unclaimed)

    @property
    def is_busy(self) -> bool:
        """Whether the engine must keep polling: pulls in flight, a notification going out."""
        return bool(self.num_in_flight) or time.monotonic() < self._flush_until

    @property
    def num_awaiting_params(self) -> int:
        return sum(r.pending_prefill is not None for r in list(self.scheduler.pulling))

    def advance(self, peers: dict[str, dict[str, Any]]) -> PullNews:
        """Take P's params that came in, start the pulls of newly admitted requests, finish
        those that ended."""
        news = PullNews()
        pulling = {id(p.request) for p in self._pulls}
        for request in list(self.scheduler.pulling):
            if id(request) in pulling:
                continue
            if request.remote_prefill is None:
                self._take_params(request, news, peers)
            else:
                self._pulls.append(self._start(request, peers))
        self._poll(news, peers)
        self._poll_orphans(peers)
        self._poll_unclaimed(peers)
        return news

    def ended(self, request: Request, peers: dict[str, dict[str, Any]]) -> None:
        """A request that was to pull its prompt ended (aborted, or its first token ended it):
        pages a transfer still writes stay held until it ends; P drops a lease not needed."""
        pull = next((p for p in self._pulls if p.request is request), None)
        held, request.held = request.held, None
        if pull is not None:
            self._pulls.remove(pull)
            self._orphans.append(_Orphan(pull.handle, held, pull.prefill))
            return
        if held is not None:
            self._release_held(held)
        if request.remote_prefill is not None:
            self._release_lease(request.remote_prefill, peers)
        elif request.pending_prefill is not None:
            self._unclaimed.append(request.pending_prefill)

    def _take_params(
        self, request: Request, news: PullNews, peers: dict[str, dict[str, Any]]
    ) -> None:
        """A request admitted before P's params: start its pull next round once they came
        (its first token goes out now), or fail it when they never will."""
        pending = request.pending_prefill
        if not pending.done:
            return
        prefill, error = pending.prefill, pending.error
        if prefill is not None and error is None:
            try:
                prefill.check_prompt(request.num_prompt_tokens)
            except InvalidParameterError as mismatch:
                self._release_lease(prefill, peers)
                error = mismatch
        if error is not None:  # not a transfer that failed: P's params cannot be used here
            self.scheduler.pulled(request, ok=False)
            news.failed.append((request, error))
        elif prefill is None:
            self._count_failure("no_params")
            self._fail(request, "no_params", f"of bootstrap room {pending.room}", news)
        else:
            request.pending_prefill = None
            request.remote_prefill = prefill
            news.arrived.append(request)

    def _start(self, request: Request, peers: dict[str, dict[str, Any]]) -> _Pull:
        prefill = request.remote_prefill
        hit_pages = request.num_computed_tokens // self.kv.page_size
        remote = prefill.remote_block_ids[hit_pages:]
        local = request.page_ids[hit_pages : len(prefill.remote_block_ids)]
        self.stats.cached_pages += hit_pages
        pull = _Pull(request, prefill, None, time.monotonic(), len(remote), 0)
        pull.cause = self._refusal(prefill, peers)
        if pull.cause is not None:
            self._count_failure(pull.cause)
            return pull
        slots = None
        if request.state_slot is not None and prefill.remote_state_slot is not None:
            slots = (prefill.remote_state_slot, request.state_slot)
        try:
            self.transport.connect(peers[prefill.remote_engine_id])
            pull.handle = self.transport.pull(
                prefill.remote_engine_id,
                page_runs(remote, local),
                slots,
                prefill.remote_request_id.encode(),
            )
        except Exception:  # P unreachable: recompute (or fail) this request, serve the rest
            logger.exception("pull from %s failed to start", prefill.remote_engine_id)
            pull.cause = "transport"
            self._count_failure(pull.cause)
        pull.num_bytes = len(remote) * self.page_bytes
        return pull

    def _refusal(self, prefill: RemotePrefill, peers: dict[str, dict[str, Any]]) -> str | None:
        if prefill.remote_engine_id not in peers:
            return "unknown_peer"
        if time.time() > prefill.lease_expires - self.lease_margin:
            return "lease_expired"
        if self.inject_error_rate and self._random.random() < self.inject_error_rate:
            return "injected"
        return None

    def _poll(self, news: PullNews, peers: dict[str, dict[str, Any]]) -> None:
        for pull in list(self._pulls):
            state = self._state(pull.handle)
            if state == "PROC":
                continue
            self._pulls.remove(pull)
            ok = state == "DONE" and time.time() < pull.prefill.lease_expires
            if ok:
                self._count_success(pull)
                self.scheduler.pulled(pull.request, ok=True)
                continue
            cause = pull.cause  # counted when the pull failed to start
            if cause is None:
                # A pull that completed past the expiry: P may have reused the pages meanwhile.
                cause = "lease_expired" if state == "DONE" else "transport"
                self._count_failure(cause)
            self._release_lease(pull.prefill, peers)
            self._fail(pull.request, cause, pull.prefill.remote_engine_id, news)

    def _fail(self, request: Request, cause: str, source: str, news: PullNews) -> None:
        """The request's prompt KV will not come: compute it here, or end the request."""
        self.scheduler.pulled(request, ok=False)
        if self.on_failure == "error":
            message = (
                f"the prompt's KV could not be pulled from the prefill instance {source}: "
                f"{PULL_FAILURES[cause]} "
                "(this decode instance runs with --pd-on-transfer-failure error)"
            )
            news.failed.append((request, TransferFailedError(message)))

    def _poll_orphans(self, peers: dict[str, dict[str, Any]]) -> None:
        for orphan in list(self._orphans):
            state = self._state(orphan.handle)
            if state == "PROC":
                continue
            self._orphans.remove(orphan)
            self._release_held(orphan.held)
            if state != "DONE":  # a completed pull told P itself
                self._release_lease(orphan.prefill, peers)

    def _poll_unclaimed(self, peers: dict[str, dict[str, Any]]) -> None:
        for pending in [p for p in self._unclaimed if p.done]:
            self._unclaimed.remove(pending)
            if pending.prefill is not None:
                self._release_lease(pending.prefill, peers)

    def _release_held(self, held: HeldKV) -> None:
        self.kv.release_held(held.page_ids)
        if held.state_slot is not None:
            self.kv.release_state(held.state_slot)

    def _state(self, handle: object) -> str:
        if handle is None:
            return "ERR"
        try:
            return self.transport.poll(handle)
        except Exception:
            logger.exception("polling a pull failed")
            return "ERR"

    def _release_lease(self, prefill: RemotePrefill, peers: dict[str, dict[str, Any]]) -> None:
        """Tell P to drop a lease D will not pull from, now rather than at its expiry (which
        ends it anyway when P is unknown or gone)."""
        engine_id = prefill.remote_engine_id
        if engine_id not in peers:
            return
        try:
            self.transport.connect(peers[engine_id])
            self.transport.notify(engine_id, prefill.remote_request_id.encode())
            self._flush_until = time.monotonic() + NOTIFY_FLUSH_S
        except Exception:
            logger.warning("could not tell %s to drop its lease", engine_id)

    def _count_success(self, pull: _Pull) -> None:
        self.stats.completed += 1
        self.stats.pages += pull.num_pages
        self.stats.bytes += pull.num_bytes
        self.stats.seconds += time.monotonic() - pull.started

    def _count_failure(self, cause: str) -> None:
        self.stats.failed += 1
        self.stats.failures[cause] = self.stats.failures.get(cause, 0) + 1
