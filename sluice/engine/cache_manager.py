"""The KV page pool and the per-request page tables drawn from it. Plain Python, no torch."""

from __future__ import annotations

from collections import deque

from sluice.engine.request import Request


class OutOfPagesError(RuntimeError):
    pass


class PagePool:
    """Fixed pool of KV pages with reference counts (a page may be shared by several owners)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for page in pages:
            assert self._refs[page] > 0, f"page {page} is free"
            self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        for page in pages:
            assert self._refs[page] > 0, f"page {page} released twice"
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def ref_count(self, page: int) -> int:
        return self._refs[page]


class KVCacheManager:
    """Grows and frees request page tables; the scheduler asks it whether a step fits."""

    def __init__(self, pool: PagePool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_pages * self.page_size

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.page_size) - len(request.page_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.pages_needed(request, num_new_tokens) <= self.pool.num_free

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        request.page_ids.extend(self.pool.allocate(self.pages_needed(request, num_new_tokens)))

    def free(self, request: Request) -> None:
        self.pool.release(request.page_ids)
        request.page_ids = []
