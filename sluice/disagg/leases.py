"""P's side: the pages (and state slot) of prefills whose decode runs elsewhere, each kept under
a lease until D confirms its pull or the lease expires.

A lease is granted when the prefill finishes (the scheduler held its pages instead of freeing
them); D's NIXL pull notifies its id on completion, D sends it on its own when it needs nothing
(the first token already ended the request) or gave up, and `expire` frees whatever D never
claimed. Pages are never freed under a reader: D starts a pull only while the lease has a margin
left and discards a pull that completes after the expiry (see `decode.py`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sluice.engine.cache_manager import KVCacheManager


@dataclass
class Lease:
    lease_id: str
    page_ids: list[int]
    state_slot: int | None
    expires: float  # unix time


class LeaseTable:
    def __init__(self, kv: KVCacheManager, seconds: float) -> None:
        self.kv = kv
        self.seconds = seconds
        self._leases: dict[str, Lease] = {}
        self.num_expired = 0  # leases D never claimed (D died, or was too late)

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    @property
    def num_pages(self) -> int:
        return sum(len(lease.page_ids) for lease in self._leases.values())

    def grant(self, page_ids: list[int], state_slot: int | None) -> Lease:
        """Keep pages (already held, see `KVCacheManager.hold`) and a detached state slot."""
        lease = Lease(uuid.uuid4().hex, page_ids, state_slot, time.time() + self.seconds)
        self._leases[lease.lease_id] = lease
        return lease

    def release(self, lease_id: str) -> bool:
        """D is done with the lease (or never needed it); False if it was unknown or gone."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._free(lease)
        return True

    def expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for lease in [lease for lease in self._leases.values() if lease.expires <= now]:
            del self._leases[lease.lease_id]
            self._free(lease)
            self.num_expired += 1

    def release_all(self) -> None:
        for lease_id in list(self._leases):
            self.release(lease_id)

    def _free(self, lease: Lease) -> None:
        self.kv.release_held(lease.page_ids)
        if lease.state_slot is not None:
            self.kv.state_pool.free(lease.state_slot)
