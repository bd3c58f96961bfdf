"""D's side: pull each admitted request's missing prompt pages (and its state) from P.

The scheduler admits such a request with pages for its whole prompt, its own prefix cache's hit
included, and parks it in `Scheduler.pulling`; here its pull starts (only the pages past the
hit, as page runs), is polled each step, and ends in `Scheduler.pulled`. A pull that fails (P
gone, the lease too close to expiry or past it when the pull ends, an injected fault) is
recomputed locally from the prefix cache's hit: the request still gets its answer, later, and
P is told to drop the lease.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from sluice.disagg.params import RemotePrefill
from sluice.disagg.transport import KVTransport, page_runs
from sluice.engine.cache_manager import KVCacheManager
from sluice.engine.request import HeldKV, Request
from sluice.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Why a pull failed: P unknown (its side channel did not answer), the lease (nearly) over, an
# injected fault (`--pd-inject-transfer-errors`), or the transfer itself.
PULL_FAILURES = ("unknown_peer", "lease_expired", "injected", "transport")


@dataclass
class _Pull:
    request: Request
    prefill: RemotePrefill
    handle: object  # the transport's; None: failed before it started
    started: float
    num_pages: int
    num_bytes: int


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


class PullQueue:
    def __init__(
        self,
        transport: KVTransport,
        kv: KVCacheManager,
        scheduler: Scheduler,
        page_bytes: int,
        inject_error_rate: float = 0.0,
        lease_margin: float = 1.0,
    ) -> None:
        self.transport = transport
        self.kv = kv
        self.scheduler = scheduler
        self.page_bytes = page_bytes
        self.inject_error_rate = inject_error_rate
        self.lease_margin = lease_margin  # seconds a lease must still have for a pull to start
        self._random = random.Random(0)
        self._pulls: list[_Pull] = []
        self._orphans: list[tuple[object, HeldKV]] = []  # pulls of finished requests
        self.stats = PullStats()

    @property
    def num_in_flight(self) -> int:
        return len(self._pulls) + len(self._orphans)

    def advance(self, peers: dict[str, dict[str, Any]]) -> None:
        """Start the pulls of newly admitted requests; finish those that ended."""
        pulling = {id(p.request) for p in self._pulls}
        for request in self.scheduler.pulling:
            if id(request) not in pulling:
                self._pulls.append(self._start(request, peers))
        self._poll()
        self._poll_orphans()

    def abandon(self, request: Request) -> None:
        """A pulling request ended (aborted): its pages stay held until its transfer ends."""
        for pull in self._pulls:
            if pull.request is request:
                self._pulls.remove(pull)
                self._orphans.append((pull.handle, request.held))
                request.held = None
                return

    def _start(self, request: Request, peers: dict[str, dict[str, Any]]) -> _Pull:
        prefill = request.remote_prefill
        hit_pages = request.num_computed_tokens // self.kv.page_size
        remote = prefill.remote_block_ids[hit_pages:]
        local = request.page_ids[hit_pages : len(prefill.remote_block_ids)]
        self.stats.cached_pages += hit_pages
        pull = _Pull(request, prefill, None, time.monotonic(), len(remote), 0)
        cause = self._refusal(prefill, peers)
        if cause is not None:
            self._count_failure(cause)
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
            self._count_failure("transport")
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

    def _poll(self) -> None:
        for pull in list(self._pulls):
            state = self._state(pull.handle)
            if state == "PROC":
                continue
            self._pulls.remove(pull)
            ok = state == "DONE" and time.time() < pull.prefill.lease_expires
            if state == "DONE" and not ok:
                self._count_failure("lease_expired")  # P may have reused the pages meanwhile
            if ok:
                self._count_success(pull)
            else:
                self._release_remote(pull.prefill)
                if pull.handle is not None and state == "ERR":
                    self._count_failure("transport")
            self.scheduler.pulled(pull.request, ok)

    def _poll_orphans(self) -> None:
        for entry in list(self._orphans):
            handle, held = entry
            if self._state(handle) == "PROC":
                continue
            self._orphans.remove(entry)
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

    def _release_remote(self, prefill: RemotePrefill) -> None:
        """Tell P to drop the lease now rather than at its expiry (when P is still there)."""
        try:
            self.transport.notify(prefill.remote_engine_id, prefill.remote_request_id.encode())
        except Exception:
            logger.warning("could not tell %s to drop its lease", prefill.remote_engine_id)

    def release_unused(self, prefill: RemotePrefill, peers: dict[str, dict[str, Any]]) -> None:
        """A request ended before it pulled (its first token ended it): drop P's lease."""
        if prefill.remote_engine_id in peers:
            try:
                self.transport.connect(peers[prefill.remote_engine_id])
            except Exception:
                return
            self._release_remote(prefill)

    def _count_success(self, pull: _Pull) -> None:
        self.stats.completed += 1
        self.stats.pages += pull.num_pages
        self.stats.bytes += pull.num_bytes
        self.stats.seconds += time.monotonic() - pull.started

    def _count_failure(self, cause: str) -> None:
        self.stats.failed += 1
        self.stats.failures[cause] = self.stats.failures.get(cause, 0) + 1
