"""The KV page pool, request page tables drawn from it, and their link to the prefix cache.

Plain Python, no torch. Page references: a request holds one reference on every page in its
page table (matched from the prefix cache or newly allocated) and releases them all when it
finishes or is preempted; the prefix cache holds one more on every page it keeps.

Hybrid models add a state slot per request (see `StatePool`): taken when the request is admitted,
filled from the prefix cache's checkpoint or zeroed, given back with its pages. Their prefill
chunks end on page boundaries so the state after each chunk can be checkpointed on the tree node
that ends there. A verify step (speculative decoding) borrows one more slot per draft for the
step: its run leaves the state after each of its tokens, and the update keeps the one after the
accepted drafts (`commit_verified_state`), since a recurrent state cannot be rolled back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sluice.engine.request import Request
from sluice.engine.state_pool import StatePool

if TYPE_CHECKING:
    from sluice.engine.prefix_cache import PrefixCache, RadixNode


class OutOfPagesError(RuntimeError):
    pass


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


def truncate_pages(pool: PagePool, page_ids: list[int], num_tokens: int, page_size: int) -> None:
    """Give `pool` back the pages of the table `page_ids` past its first `num_tokens` tokens."""
    keep = pages_for(num_tokens, page_size)
    pool.release(page_ids[keep:])
    del page_ids[keep:]


class PagePool:
    """Fixed pool of KV pages with reference counts (a page may be shared by several owners).

    Free pages form a stack: the most recently freed are reused first, so the pages in use stay
    few and warm (the pool's memory is only resident where written, see `memory.lazy_zeros`),
    and a request's pages tend to be consecutive, which attention reads as one slice.

    The prefix cache watches one thing: which of its pages only it holds (those evicting frees).
    The pool tells it whenever a page goes from one holder to two or back.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # page 0 on top
        self._refs = [0] * num_pages
        self._on_sharing: Callable[[int, bool], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def watch_sharing(self, callback: Callable[[int, bool], None]) -> None:
        """Call `callback(page, shared)` whenever a page's holders go from one to two (shared)
        or from two back to one."""
        assert self._on_sharing is None, "the pool has a watcher already"
        self._on_sharing = callback

    def retain(self, pages: list[int]) -> None:
        for page in pages:
            refs = self._refs[page]
            assert refs > 0, f"page {page} is free"
            self._refs[page] = refs + 1
            if refs == 1 and self._on_sharing is not None:
                self._on_sharing(page, True)

    def release(self, pages: list[int]) -> None:
        for page in reversed(pages):  # so the next allocation gets them back in order
            refs = self._refs[page] - 1
            assert refs >= 0, f"page {page} released twice"
            self._refs[page] = refs
            if refs == 0:
                self._free.append(page)
            elif refs == 1 and self._on_sharing is not None:
                self._on_sharing(page, False)

    def ref_count(self, page: int) -> int:
        return self._refs[page]


class KVCacheManager:
    """Grows and frees request page tables; the scheduler asks it whether a step fits."""

    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        prefix_cache: PrefixCache | None = None,
        state_pool: StatePool | None = None,
    ) -> None:
        self.pool = pool
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self.state_pool = state_pool

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_pages * self.page_size

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, pages_for(total, self.page_size) - len(request.page_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.pages_needed(request, num_new_tokens)
        if needed <= self.pool.num_free:
            return True
        cache = self.prefix_cache
        return cache is not None and needed <= self.pool.num_free + cache.num_evictable_pages

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        needed = self.pages_needed(request, num_new_tokens)
        if needed > self.pool.num_free and self.prefix_cache is not None:
            self.prefix_cache.evict(needed - self.pool.num_free)
        request.page_ids.extend(self.pool.allocate(needed))

    def trim(self, request: Request) -> None:
        """Give back the pages past the request's computed tokens (those only rejected draft
        tokens were written to); the prefix cache never holds them (it takes full computed
        pages only)."""
        truncate_pages(self.pool, request.page_ids, request.num_computed_tokens, self.page_size)

    def hold(self, request: Request) -> list[int]:
        """Keep a request's pages from reuse after it finishes, while another process still
        reads them (a prefill whose KV a decode instance pulls); `release_held` ends it."""
        self.pool.retain(request.page_ids)
        return list(request.page_ids)

    def release_held(self, page_ids: list[int]) -> None:
        self.pool.release(page_ids)

    def detach_state(self, request: Request) -> int | None:
        """Take a finishing request's state slot away from it, so that freeing the request
        keeps the slot (and its state) for another process to read; `release_state` ends it."""
        slot, request.state_slot = request.state_slot, None
        return slot

    def release_state(self, slot: int) -> None:
        self.state_pool.free(slot)

    def match_prefix(self, request: Request) -> None:
        """Start a request with nothing computed from the longest cached prefix of its tokens."""
        # Prompt logprobs are computed with the prompt: a cached prefix would have none.
        if (
            self.prefix_cache is None
            or request.num_computed_tokens
            or request.params.prompt_logprobs is not None
        ):
            return
        hit = self.prefix_cache.match(request.token_ids(0, request.num_tokens), request.cache_salt)
        self.pool.retain(hit.page_ids)
        self._move_lock(request, hit.node)
        request.page_ids = list(hit.page_ids)
        request.num_inserted_pages = len(hit.page_ids)
        request.num_computed_tokens = hit.num_tokens
        request.num_cached_tokens = min(hit.num_tokens, request.num_prompt_tokens)
        request.checkpoint_target = hit.num_kv_tokens if hit.num_kv_tokens > hit.num_tokens else 0

    def acquire_state(self, request: Request, fill: bool = True) -> bool:
        """Give an admitted request of a hybrid model its state slot, holding the state after its
        computed tokens (unless not `fill`: a transfer from another engine fills it). False if
        no slot can be had."""
        pool = self.state_pool
        if pool is None or request.state_slot is not None:
            return True
        if pool.num_free == 0 and self.prefix_cache is not None:
            self.prefix_cache.evict_checkpoints(1, keep=request.prefix_node)
        if pool.num_free == 0:
            return False
        request.state_slot = pool.allocate()
        if not fill:
            return True
        if request.num_computed_tokens:
            pool.copy(request.prefix_node.state_checkpoint, request.state_slot)
        else:
            pool.zero(request.state_slot)
        return True

    def acquire_verify_states(self, request: Request, num_drafts: int, num_reserved: int) -> int:
        """Hybrid models: a slot for each of the request's drafts to verify this step (the run's
        state after each of its tokens but the last, which goes to the request's own slot), from
        the free slots and the prefix cache's checkpoints (evicted LRU), leaving `num_reserved`
        slots to the requests waiting for admission. Returns how many drafts got one: the others
        are not verified this step."""
        pool = self.state_pool
        if pool is None or num_drafts == 0:
            return num_drafts
        cache = self.prefix_cache
        evictable = cache.num_checkpoints if cache is not None else 0
        wanted = max(0, min(num_drafts, pool.num_free + evictable - num_reserved))
        if wanted > pool.num_free:
            cache.evict_checkpoints(wanted - pool.num_free)
        request.verify_state_slots = [pool.allocate() for _ in range(min(wanted, pool.num_free))]
        return len(request.verify_state_slots)

    def commit_verified_state(self, request: Request, run_start: int) -> None:
        """After a hybrid request's verify run from `run_start` computed tokens, which left the
        state after each of its tokens in its verify slots and the last one in its own slot: the
        request keeps the state after its computed tokens (the accepted drafts; a slot changes
        hands, no state is copied), a page boundary inside the kept run is checkpointed from the
        state there, and the other slots go back to the pool."""
        states = [*request.verify_state_slots, request.state_slot]  # after each token of the run
        request.verify_state_slots = []
        end = request.num_computed_tokens
        boundary = end - end % self.page_size
        if run_start < boundary < end:
            self._cache_pages(request, boundary, states[boundary - run_start - 1])
        request.state_slot = states[end - run_start - 1]
        for slot in states:
            if slot != request.state_slot:
                self.state_pool.free(slot)

    def drop_state(self, request: Request) -> None:
        """Give back the request's state slot, if it has one: when it ends, or just before, when
        its state is past its computed tokens (a stop string inside a run of accepted drafts),
        so that state is never checkpointed."""
        if request.state_slot is not None:
            self.state_pool.free(request.state_slot)
            request.state_slot = None

    def align_chunk(self, request: Request, num_tokens: int) -> int:
        """Shorten a hybrid model's prefill chunk to end on a page boundary (or at the branch point
        its match found), so the state after it can be checkpointed. Chunks within one page,
        decodes among them, stay as they are."""
        if self.state_pool is None or self.prefix_cache is None:
            return num_tokens
        start = request.num_computed_tokens
        end = start + num_tokens
        if start < request.checkpoint_target < end:
            return request.checkpoint_target - start
        aligned_end = end // self.page_size * self.page_size
        return aligned_end - start if aligned_end > start else num_tokens

    def cache_computed(self, request: Request) -> None:
        """Offer the request's newly completed full pages to the prefix cache.

        They go in below the node the request holds locked (which ends at its pages already
        offered), so a step's cost is that of its new pages, whatever the context length. Where
        the cache already holds the same prefix (computed by a request that ran at the same
        time), the request switches to the cache's pages and lets its own copies go.
        """
        self._cache_pages(request, request.num_computed_tokens, request.state_slot)

    def _cache_pages(self, request: Request, num_tokens: int, state_slot: int | None) -> None:
        """Offer the full pages of the request's first `num_tokens` tokens; `state_slot` holds
        the state after them (hybrid models), checkpointed when they end on a page."""
        cache = self.prefix_cache
        full_pages = num_tokens // self.page_size
        done = request.num_inserted_pages
        if cache is None or full_pages <= done:
            return
        above = request.prefix_node
        assert above is not None or done == 0, "pages were offered without a lock on them"
        tokens = request.token_ids(done * self.page_size, full_pages * self.page_size)
        pages = request.page_ids[done:full_pages]
        node = cache.insert(tokens, pages, request.cache_salt, after=above)
        self._adopt_pages(request, done, cache.prefix_pages(node, after=above))
        self._lock_deeper(request, node)
        request.num_inserted_pages = full_pages
        if state_slot is not None and num_tokens % self.page_size == 0:
            self._checkpoint(request, node, state_slot, num_tokens)

    def _checkpoint(
        self, request: Request, node: RadixNode, state_slot: int, num_tokens: int
    ) -> None:
        """Checkpoint the state in `state_slot` on `node`, which ends after the request's first
        `num_tokens` tokens. Past the prompt only the newest checkpoint is kept: a later turn of
        the conversation resumes from there, and one checkpoint per page of output would crowd
        out the shared prompts'."""
        cache = self.prefix_cache
        if not cache.add_checkpoint(node, state_slot):
            return
        if num_tokens <= request.num_prompt_tokens:
            return
        previous = request.output_checkpoint
        if previous is not None and previous is not node and previous.state_checkpoint is not None:
            cache.drop_checkpoint(previous)
        request.output_checkpoint = node

    def free(self, request: Request) -> None:
        """Release everything a finished or preempted request holds, caching its prefix first."""
        self.cache_computed(request)
        self._move_lock(request, None)
        self.pool.release(request.page_ids)
        request.page_ids = []
        request.num_inserted_pages = 0
        request.checkpoint_target = 0
        request.output_checkpoint = None
        self.drop_state(request)
        for slot in request.verify_state_slots:  # preempted while being scheduled to verify
            self.state_pool.free(slot)
        request.verify_state_slots = []

    def _adopt_pages(self, request: Request, start: int, cached_pages: list[int]) -> None:
        """Use the cache's copies of the request's pages from page `start` on."""
        for i, page in enumerate(cached_pages, start):
            if request.page_ids[i] != page:
                self.pool.retain([page])
                self.pool.release([request.page_ids[i]])
                request.page_ids[i] = page

    def _lock_deeper(self, request: Request, node: RadixNode) -> None:
        """Move the request's lock down its own path to `node`: only the nodes in between change."""
        if request.prefix_node is None:
            self.prefix_cache.lock(node)
        else:
            self.prefix_cache.move_lock(request.prefix_node, node)
        request.prefix_node = node

    def _move_lock(self, request: Request, node: RadixNode | None) -> None:
        if node is not None:
            self.prefix_cache.lock(node)
        if request.prefix_node is not None:
            self.prefix_cache.unlock(request.prefix_node)
        request.prefix_node = node
