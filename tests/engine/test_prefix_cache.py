"""The prefix cache's radix tree against a real PagePool: no model, no torch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sluice.engine.cache_manager import KVCacheManager, PagePool
from sluice.engine.prefix_cache import PrefixCache, RadixNode
from sluice.engine.request import Request
from sluice.sampling_params import SamplingParams

PAGE = 4


def make_cache(num_pages: int = 16, page_size: int = PAGE) -> tuple[PagePool, PrefixCache]:
    pool = PagePool(num_pages)
    return pool, PrefixCache(pool, page_size)


def cache_finished(
    pool: PagePool, cache: PrefixCache, tokens: Sequence[int], ns: str = ""
) -> list[int]:
    """A request computed `tokens` (whole pages) in fresh pages, cached them and finished."""
    pages = pool.allocate(len(tokens) // cache.page_size)
    cache.insert(tokens, pages, ns)
    pool.release(pages)
    return pages


def refs(pool: PagePool, pages: Sequence[int]) -> list[int]:
    return [pool.ref_count(page) for page in pages]


def namespace_node(cache: PrefixCache, ns: str = "") -> RadixNode:
    return cache.root.children[ns]


# --- match ------------------------------------------------------------------------------------


def test_empty_cache_matches_nothing():
    _, cache = make_cache()
    result = cache.match(list(range(20)))
    assert result.node is cache.root and result.page_ids == [] and result.num_tokens == 0


A = list(range(12))  # three pages of 4


@pytest.mark.parametrize(
    ("query", "num_tokens"),
    [
        ([], 0),
        (A[:3], 0),
        (A[:4], 0),  # one exact page: its last token must still be computed
        (A[:5], 4),
        (A[:8], 4),  # exact multiple: keep one token back, so one page less
        (A[:9], 8),
        (A[:12], 8),
        ([*A, 7], 12),
        ([*A, 50, 51, 52, 53, 54], 12),  # longer than anything cached
        ([*A[:6], 99, *A[7:], 0], 4),  # diverges mid second page: only the first page
        ([99, *A[1:], 0], 0),  # diverges in the first page
    ],
)
def test_match_is_page_granular_and_leaves_one_token(query: list[int], num_tokens: int):
    pool, cache = make_cache()
    pages = cache_finished(pool, cache, A)
    result = cache.match(query)
    assert result.num_tokens == num_tokens
    assert result.page_ids == pages[: num_tokens // PAGE]
    assert (result.node is cache.root) == (num_tokens == 0)
    cache.check_integrity()


def test_match_inside_a_node_splits_it_so_the_node_ends_at_the_match():
    pool, cache = make_cache()
    pages = cache_finished(pool, cache, A)
    whole = namespace_node(cache).children[tuple(A[:4])]
    result = cache.match(A[:9])
    assert result.page_ids == pages[:2] and result.node.page_ids == pages[:2]
    assert result.node.key == tuple(A[:8])
    assert list(result.node.children.values()) == [whole]  # the old node keeps the deep half
    assert whole.page_ids == pages[2:] and whole.key == tuple(A[8:])
    assert cache.num_cached_pages == 3
    cache.check_integrity()


def test_match_refreshes_the_whole_path():
    pool, cache = make_cache(page_size=2)
    cache_finished(pool, cache, [1, 1, 2, 2])
    cache_finished(pool, cache, [1, 1, 3, 3])  # splits: a shared [1, 1] with two leaves
    cache_finished(pool, cache, [4, 4])
    hit = cache.match([1, 1, 2, 2, 0])
    other = cache.match([4, 4, 0]).node
    shared = hit.node.parent
    assert shared is not None and shared.key == (1, 1)
    assert hit.node.last_access == shared.last_access < other.last_access
    assert shared.children[(3, 3)].last_access < hit.node.last_access


def test_match_neither_retains_nor_locks():
    pool, cache = make_cache()
    pages = cache_finished(pool, cache, A)
    result = cache.match([*A, 0])
    assert refs(pool, pages) == [1, 1, 1] and result.node.lock_count == 0


# --- insert -----------------------------------------------------------------------------------


def test_insert_diverging_mid_second_page_splits_at_the_page_boundary():
    pool, cache = make_cache()
    a_pages = pool.allocate(3)
    a_leaf = cache.insert(A, a_pages)
    b = [*A[:6], 99, 98, 50, 51, 52, 53]
    b_pages = pool.allocate(3)
    b_leaf = cache.insert(b, b_pages)

    shared = namespace_node(cache).children[tuple(A[:4])]
    assert shared.key == tuple(A[:4]) and shared.page_ids == a_pages[:1]
    assert shared.children == {(4, 5, 6, 7): a_leaf, (4, 5, 99, 98): b_leaf}
    assert a_leaf.key == tuple(A[4:]) and a_leaf.page_ids == a_pages[1:]
    assert b_leaf.key == tuple(b[4:]) and b_leaf.page_ids == b_pages[1:]
    assert a_leaf.parent is shared and b_leaf.parent is shared
    # Both requests still hold their pages; the tree holds one more on each page it took.
    assert refs(pool, a_pages) == [2, 2, 2]
    assert refs(pool, b_pages) == [1, 2, 2]  # b's first page duplicates a's: not taken
    assert cache.num_cached_pages == 5
    assert cache.match([*b, 0]).page_ids == [a_pages[0], *b_pages[1:]]
    cache.check_integrity()


def test_shared_pages_are_counted_once_per_holder():
    pool, cache = make_cache(num_pages=8)
    pages = pool.allocate(2)
    node = cache.insert(A[:8], pages)
    assert refs(pool, pages) == [2, 2]  # the request's and the tree's
    assert cache.num_evictable_pages == 0  # evicting now would free nothing
    pool.release(pages)  # the request finishes
    assert refs(pool, pages) == [1, 1] and cache.num_evictable_pages == 2

    hit = cache.match(A)  # a second request: retains and locks what it uses
    assert hit.page_ids == pages and hit.node is node
    pool.retain(hit.page_ids)
    cache.lock(hit.node)
    assert refs(pool, pages) == [2, 2] and cache.num_evictable_pages == 0
    assert cache.evict(8) == 0 and cache.num_cached_pages == 2
    cache.unlock(hit.node)
    pool.release(hit.page_ids)
    assert cache.num_evictable_pages == 2
    cache.check_integrity()


def test_duplicate_insert_keeps_the_tree_pages_and_retains_nothing():
    pool, cache = make_cache()
    pages = cache_finished(pool, cache, A)
    node = namespace_node(cache).children[tuple(A[:4])]
    duplicates = pool.allocate(3)
    assert cache.insert(A, duplicates) is node
    assert node.page_ids == pages and cache.num_cached_pages == 3
    assert refs(pool, pages) == [1, 1, 1] and refs(pool, duplicates) == [1, 1, 1]
    pool.release(duplicates)  # the caller frees its own copies
    assert pool.num_free == 16 - 3


def test_insert_of_a_cached_prefix_splits_and_returns_the_node_ending_there():
    pool, cache = make_cache()
    pages = cache_finished(pool, cache, A)
    duplicates = pool.allocate(2)
    node = cache.insert(A[:8], duplicates)
    assert node.key == tuple(A[:8]) and node.page_ids == pages[:2]
    assert refs(pool, duplicates) == [1, 1] and cache.num_cached_pages == 3
    cache.check_integrity()


def test_insert_of_nothing_returns_the_root():
    _, cache = make_cache()
    assert cache.insert([], []) is cache.root
    assert cache.root.children == {}


def test_insert_needs_whole_pages():
    pool, cache = make_cache()
    with pytest.raises(AssertionError, match="whole pages"):
        cache.insert(A[:7], pool.allocate(2))


def test_namespaces_never_match_each_other():
    pool, cache = make_cache()
    salted = cache_finished(pool, cache, A, ns="salt")
    assert cache.match([*A, 0]).num_tokens == 0
    assert cache.match([*A, 0], "other").num_tokens == 0
    assert cache.match([*A, 0], "salt").page_ids == salted
    plain = cache_finished(pool, cache, A)  # the same tokens, unsalted: their own pages
    assert cache.match([*A, 0]).page_ids == plain
    assert set(cache.root.children) == {"salt", ""} and cache.num_cached_pages == 6
    cache.check_integrity()


def test_insert_after_a_node_continues_its_prefix():
    pool, cache = make_cache()
    head = cache.insert(A[:8], pool.allocate(2))
    tail_pages = pool.allocate(1)
    tail = cache.insert(A[8:], tail_pages, after=head)
    assert tail.parent is head and tail.key == tuple(A[8:])
    assert cache.prefix_pages(tail, after=head) == tail_pages
    assert cache.match([*A, 0]).node is tail
    assert cache.insert([], [], after=head) is head
    cache.check_integrity()


class Unreachable:
    """Stands in for a node's parent: any use of it fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"read .{name} above the request's node")


def computed(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """The scheduler's part: allocate, compute `num_tokens` more, cache the full pages."""
    kv.allocate(request, num_tokens)
    request.num_computed_tokens += num_tokens
    kv.cache_computed(request)


def test_caching_a_decoded_page_reads_nothing_above_the_requests_node():
    """The work per page is independent of the context: nothing above the request's locked node
    is read, even when another request cached the same page first (a split and an adoption)."""
    pool = PagePool(64)
    cache = PrefixCache(pool, PAGE)
    kv = KVCacheManager(pool, PAGE, cache)
    first, second = (
        Request(name, list(range(40)), SamplingParams(max_tokens=8), max_total_tokens=64)
        for name in "ab"
    )
    for request in (first, second):
        kv.match_prefix(request)
        computed(kv, request, 40 - request.num_computed_tokens)
        request.output_token_ids += [100, 101, 102, 103, 104, 105, 106, 107, 108]
    computed(kv, first, 8)  # two pages in one node
    held = second.prefix_node
    above = held.parent
    held.parent = Unreachable()
    for _ in range(4):  # the first of those pages again, a token at a time: splits the node
        computed(kv, second, 1)
    held.parent = above
    assert second.prefix_node.parent is held and second.num_inserted_pages == 11
    assert second.page_ids[:11] == first.page_ids[:11]  # adopted the tree's copy
    assert (held.lock_count, second.prefix_node.lock_count) == (2, 2)
    cache.check_integrity()
    for request in (first, second):
        kv.free(request)
    cache.check_integrity()
    assert cache.num_evictable_pages == cache.num_cached_pages == 12


# --- locks ------------------------------------------------------------------------------------


def test_lock_counts_run_up_to_the_root():
    pool, cache = make_cache()
    cache_finished(pool, cache, A)
    deep = cache.match([*A, 0]).node
    mid = cache.match(A[:9]).node  # splits `deep`'s node; `deep` still ends at token 12
    cache.lock(deep)
    cache.lock(mid)
    assert (deep.lock_count, mid.lock_count, cache.root.lock_count) == (1, 2, 2)
    cache.check_integrity()
    cache.unlock(deep)
    cache.unlock(mid)
    assert (deep.lock_count, mid.lock_count, cache.root.lock_count) == (0, 0, 0)


def test_move_lock_counts_the_lock_only_below_the_old_node():
    pool, cache = make_cache()
    cache_finished(pool, cache, A)
    mid = cache.match(A[:9]).node
    deep = cache.match([*A, 0]).node
    cache.lock(mid)
    cache.lock(mid)
    cache.move_lock(mid, deep)
    assert (deep.lock_count, mid.lock_count, cache.root.lock_count) == (1, 2, 2)
    assert cache.num_evictable_pages == 0
    cache.check_integrity()
    cache.unlock(mid)
    cache.unlock(deep)
    assert cache.root.lock_count == 0 and cache.num_evictable_pages == 3
    cache.check_integrity()


def test_unlock_without_a_lock_is_an_error():
    pool, cache = make_cache()
    cache_finished(pool, cache, A)
    with pytest.raises(AssertionError, match="holds no lock"):
        cache.unlock(cache.match([*A, 0]).node)


def test_locking_an_evicted_node_is_an_error():
    pool, cache = make_cache()
    cache_finished(pool, cache, A)
    hit = cache.match([*A, 0])
    cache.evict(3)  # the caller forgot to lock right after matching
    with pytest.raises(AssertionError, match="evicted"):
        cache.lock(hit.node)


# --- eviction ---------------------------------------------------------------------------------


def freed(pool: PagePool, pages: Sequence[int]) -> list[int]:
    return [page for page in pages if pool.ref_count(page) == 0]


def test_eviction_is_lru_and_leaves_first():
    pool, cache = make_cache(page_size=2)
    shared, x = cache_finished(pool, cache, [1, 1, 2, 2])
    _, y = cache_finished(pool, cache, [1, 1, 3, 3])  # splits after the shared page
    (z,) = cache_finished(pool, cache, [4, 4])
    cache.match([1, 1, 3, 3, 0])  # y and the shared page become the most recent
    everything = [shared, x, y, z]
    assert cache.num_evictable_pages == 4

    assert cache.evict(1) == 1 and freed(pool, everything) == [x]  # the oldest leaf
    assert cache.evict(1) == 1 and freed(pool, everything) == [x, z]
    assert cache.evict(1) == 1 and freed(pool, everything) == [x, y, z]
    assert cache.evict(1) == 1 and freed(pool, everything) == everything  # a leaf only now
    assert cache.evict(1) == 0
    assert cache.root.children == {} and cache.num_cached_pages == 0
    cache.check_integrity()


def test_evict_takes_as_many_leaves_as_needed_in_one_call():
    pool, cache = make_cache(page_size=2)
    first = cache_finished(pool, cache, [1, 1, 2, 2])
    second = cache_finished(pool, cache, [3, 3])
    third = cache_finished(pool, cache, [4, 4, 5, 5])
    assert cache.evict(3) == 3  # nodes go whole: `first` (2 pages) then `second`
    assert freed(pool, first + second + third) == first + second
    assert cache.num_cached_pages == 2


def test_locked_paths_are_never_evicted():
    pool, cache = make_cache(page_size=2)
    kept = cache_finished(pool, cache, [1, 1, 2, 2])
    other = cache_finished(pool, cache, [1, 1, 3, 3])
    hit = cache.match([1, 1, 2, 2, 0])
    cache.lock(hit.node)
    assert cache.num_evictable_pages == 1  # the shared page is on the locked path
    assert cache.evict(16) == 1 and freed(pool, [*kept, other[1]]) == [other[1]]
    assert cache.match([1, 1, 2, 2, 0]).page_ids == kept
    cache.check_integrity()
    cache.unlock(hit.node)
    assert cache.evict(16) == 2 and pool.num_free == 16


def test_evict_prefers_nodes_whose_pages_actually_free():
    pool, cache = make_cache(page_size=2)
    running = pool.allocate(1)  # a running request cached its page and still holds it
    cache.insert([1, 1], running)
    idle = cache_finished(pool, cache, [2, 2])  # newer, but only the tree holds it
    assert cache.evict(1) == 1 and freed(pool, idle) == idle
    # The running request's node would free nothing: it stays cached.
    assert cache.evict(1) == 0 and cache.num_cached_pages == 1
    assert cache.num_evictable_pages == 0
    pool.release(running)
    assert cache.num_evictable_pages == 1 and cache.evict(1) == 1


def test_evict_drops_an_unfreeable_leaf_to_reach_a_freeable_parent():
    pool, cache = make_cache(page_size=2)
    (parent_page,) = cache_finished(pool, cache, [1, 1])
    # A request computed the whole prompt in its own pages (it did not use the cache), so the tree
    # takes only its second page, which the request still holds.
    own = pool.allocate(2)
    cache.insert([1, 1, 2, 2], own)
    (idle,) = cache_finished(pool, cache, [3, 3])  # newer, but frees a page at once
    assert refs(pool, [parent_page, *own, idle]) == [1, 1, 2, 1]
    assert cache.evict(1) == 1 and refs(pool, [idle]) == [0]
    assert cache.evict(1) == 1
    assert refs(pool, [parent_page, *own]) == [0, 1, 1]  # the request's pages are intact
    assert cache.num_cached_pages == 0
    cache.check_integrity()


def test_reset_releases_everything_unlocked():
    pool, cache = make_cache(page_size=2)
    kept = cache_finished(pool, cache, [1, 1, 2, 2])
    cache_finished(pool, cache, [1, 1, 3, 3])
    cache_finished(pool, cache, [4, 4], ns="salt")
    hit = cache.match([1, 1, 2, 2, 0])
    cache.lock(hit.node)
    cache.reset()
    assert cache.num_cached_pages == 2 and pool.num_free == 14
    assert set(cache.root.children) == {""}
    assert cache.match([1, 1, 2, 2, 0]).page_ids == kept
    cache.check_integrity()
    cache.unlock(hit.node)
    cache.reset()
    assert pool.num_free == 16 and cache.root.children == {}


# --- integrity --------------------------------------------------------------------------------


def corrupt_lock_count(pool: PagePool, cache: PrefixCache) -> None:
    namespace_node(cache).children[(0, 1, 2, 3)].lock_count += 1


def corrupt_release_behind_the_tree(pool: PagePool, cache: PrefixCache) -> None:
    pool.release([0])


def corrupt_duplicate_page(pool: PagePool, cache: PrefixCache) -> None:
    leaf = namespace_node(cache).children[(0, 1, 2, 3)].children[(4, 5, 6, 7)]
    leaf.page_ids[0] = 0


def corrupt_child_key(pool: PagePool, cache: PrefixCache) -> None:
    ns = namespace_node(cache)
    ns.children[(9, 9, 9, 9)] = ns.children.pop((0, 1, 2, 3))


def corrupt_page_count(pool: PagePool, cache: PrefixCache) -> None:
    cache._num_cached_pages += 1


def corrupt_freeable_count(pool: PagePool, cache: PrefixCache) -> None:
    namespace_node(cache).children[(0, 1, 2, 3)].num_freeable -= 1


def corrupt_evictable_count(pool: PagePool, cache: PrefixCache) -> None:
    cache._num_evictable_pages -= 1


def corrupt_lru_heap(pool: PagePool, cache: PrefixCache) -> None:
    cache._lru.remove(next(entry for entry in cache._lru if entry[3] == entry[-1].lru_seq))


def corrupt_lru_order(pool: PagePool, cache: PrefixCache) -> None:
    leaf = namespace_node(cache).children[(0, 1, 2, 3)].children[(4, 5, 6, 7)]
    cache._touch(leaf)  # a newer entry for `leaf`, then the older one made live again
    stale = next(entry for entry in cache._lru if entry[-1] is leaf and entry[3] != leaf.lru_seq)
    leaf.lru_seq = stale[3]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_lock_count, "lock count"),
        (corrupt_release_behind_the_tree, "free in the pool"),
        (corrupt_duplicate_page, "is in nodes"),
        (corrupt_child_key, "keyed"),
        (corrupt_page_count, "num_cached_pages"),
        (corrupt_freeable_count, "freeable pages, the pool says"),
        (corrupt_evictable_count, "num_evictable_pages says"),
        (corrupt_lru_heap, "LRU entry"),
        (corrupt_lru_order, "LRU entry"),
    ],
)
def test_check_integrity_catches(corrupt: Callable[[PagePool, PrefixCache], None], message: str):
    pool, cache = make_cache()
    cache_finished(pool, cache, A)
    cache_finished(pool, cache, [*A[:4], 4, 5, 9, 9])  # splits A after its first page
    cache.check_integrity()
    corrupt(pool, cache)
    with pytest.raises(AssertionError, match=message):
        cache.check_integrity()


# --- random sequences against a model ---------------------------------------------------------

SIM_PAGE = 2
SIM_PAGES = 24
Prefix = tuple[str, tuple[int, ...]]  # (namespace, tokens of whole pages)


@dataclass
class SimRequest:
    namespace: str
    cached_prefix: tuple[int, ...]  # what it inserted
    node: RadixNode | None  # the node it keeps locked, if it keeps a lock
    page_ids: list[int]  # its page table: it holds one reference on each


class PrefixCacheMachine(RuleBasedStateMachine):
    """Requests match, retain, lock, allocate, insert, finish; eviction runs when pages run out.
    Some requests skip the cache (their pages duplicate the tree's) or drop their lock (the tree
    then holds unlocked pages a request still uses): evict must free only what it can. Running
    requests extend their prefix as the engine does (insert below their node, adopt the tree's
    copies, move the lock down), between evictions.

    The model: every cached prefix and the page holding its last page, plus each running
    request's page table. Together they give every page's exact reference count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(SIM_PAGES)
        self.cache = PrefixCache(self.pool, SIM_PAGE)
        self.cached: dict[Prefix, int] = {}
        self.running: list[SimRequest] = []

    tokens = st.lists(st.integers(0, 2), min_size=1, max_size=11)
    namespaces = st.sampled_from(["", "salt"])

    @precondition(lambda self: len(self.running) < 4)  # leave room for finished prefixes
    @rule(tokens=tokens, ns=namespaces, use_cache=st.booleans(), keep_lock=st.booleans())
    def admit(self, tokens: list[int], ns: str, use_cache: bool, keep_lock: bool) -> None:
        hit = self.cache.match(tokens if use_cache else [], ns)
        if use_cache:
            self.check_match(tokens, ns)
        self.pool.retain(hit.page_ids)
        self.cache.lock(hit.node)
        hit_prefix = tuple(tokens[: hit.num_tokens])
        missing = -(-len(tokens) // SIM_PAGE) - len(hit.page_ids)
        if self.pool.num_free < missing:
            self.evict_and_check(missing - self.pool.num_free, also_locked=[(ns, hit_prefix)])
        if self.pool.num_free < missing:  # does not fit: give back what the match took
            self.cache.unlock(hit.node)
            self.pool.release(hit.page_ids)
            return
        page_ids = hit.page_ids + self.pool.allocate(missing)
        full = len(tokens) // SIM_PAGE
        prefix = tuple(tokens[: full * SIM_PAGE])
        node = self.cache.insert(prefix, page_ids[:full], ns)
        for k in range(1, full + 1):
            self.cached.setdefault((ns, prefix[: k * SIM_PAGE]), page_ids[k - 1])
        if keep_lock:
            self.cache.lock(node)  # move the lock to the longer prefix
        self.cache.unlock(hit.node)
        self.running.append(SimRequest(ns, prefix, node if keep_lock else None, page_ids))

    @precondition(lambda self: self.cached and len(self.running) < 4)
    @rule(
        pick=st.integers(0, 1000), suffix=tokens, use_cache=st.booleans(), keep_lock=st.booleans()
    )
    def admit_extension(
        self, pick: int, suffix: list[int], use_cache: bool, keep_lock: bool
    ) -> None:
        """Extend a cached prefix: deep paths, splits, and trees shared with running requests."""
        ns, prefix = sorted(self.cached)[pick % len(self.cached)]
        self.admit([*prefix, *suffix], ns, use_cache, keep_lock)

    @precondition(lambda self: any(r.node is not None for r in self.running))
    @rule(pick=st.integers(0, 100), suffix=st.lists(st.integers(0, 2), min_size=1, max_size=7))
    def extend(self, pick: int, suffix: list[int]) -> None:
        """A locked request computes more whole pages; the tree may hold some of them already."""
        request = self.pick_locked(pick)
        num_pages = len(suffix) // SIM_PAGE
        if self.pool.num_free < num_pages:
            self.evict_and_check(num_pages - self.pool.num_free)
        if self.pool.num_free < num_pages:
            return
        tokens = suffix[: num_pages * SIM_PAGE]
        own = self.pool.allocate(num_pages)
        node = self.cache.insert(tokens, own, request.namespace, after=request.node)
        tree_pages = self.cache.prefix_pages(node, after=request.node)
        assert len(tree_pages) == num_pages
        for mine, tree_page in zip(own, tree_pages):
            if mine != tree_page:  # the cache_manager's adoption
                self.pool.retain([tree_page])
                self.pool.release([mine])
        self.cache.move_lock(request.node, node)
        prefix = request.cached_prefix + tuple(tokens)
        done = len(request.cached_prefix) // SIM_PAGE
        for k, page in enumerate(tree_pages, start=done + 1):
            # The tree's page for that prefix: the one it held already, or the request's.
            assert self.cached.setdefault((request.namespace, prefix[: k * SIM_PAGE]), page) == page
        request.cached_prefix, request.node = prefix, node
        request.page_ids += tree_pages

    @precondition(lambda self: any(r.node is not None for r in self.running))
    @rule(pick=st.integers(0, 100))
    def drop_lock(self, pick: int) -> None:
        """A request lets its lock go but keeps its pages: they stay cached, unlocked."""
        request = self.pick_locked(pick)
        self.cache.unlock(request.node)
        request.node = None

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100))
    def finish(self, pick: int) -> None:
        self.release(self.running.pop(pick % len(self.running)))

    @rule(tokens=tokens, ns=namespaces)
    def match_only(self, tokens: list[int], ns: str) -> None:
        self.check_match(tokens, ns)

    @rule(num_pages=st.integers(0, SIM_PAGES))
    def evict(self, num_pages: int) -> None:
        self.evict_and_check(num_pages)

    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.cached = self.tree_contents()
        assert set(self.cached) == self.locked_prefixes()

    @invariant()
    def accounting_matches_the_model(self) -> None:
        self.cache.check_integrity()
        assert self.tree_contents() == self.cached
        expected = [0] * SIM_PAGES
        for page in self.cached.values():
            expected[page] += 1
        for request in self.running:
            for page in request.page_ids:
                expected[page] += 1
        assert [self.pool.ref_count(page) for page in range(SIM_PAGES)] == expected
        assert self.pool.num_free == expected.count(0)
        assert self.cache.num_cached_pages == len(self.cached)

    def teardown(self) -> None:
        self.evict_and_check(SIM_PAGES)  # all that can go while requests still hold pages
        while self.running:
            self.release(self.running.pop())
        self.evict_and_check(SIM_PAGES)
        assert self.pool.num_free == SIM_PAGES and self.cache.num_cached_pages == 0
        assert self.cache.root.children == {} and self.cache.root.lock_count == 0

    def pick_locked(self, pick: int) -> SimRequest:
        locked = [r for r in self.running if r.node is not None]
        return locked[pick % len(locked)]

    def release(self, request: SimRequest) -> None:
        if request.node is not None:
            self.cache.unlock(request.node)
        self.pool.release(request.page_ids)

    def check_match(self, tokens: list[int], ns: str) -> None:
        expected: list[int] = []
        while len(expected) < (len(tokens) - 1) // SIM_PAGE:
            page = self.cached.get((ns, tuple(tokens[: (len(expected) + 1) * SIM_PAGE])))
            if page is None:
                break
            expected.append(page)
        hit = self.cache.match(tokens, ns)
        assert hit.page_ids == expected and hit.num_tokens == len(expected) * SIM_PAGE
        assert (hit.node is self.cache.root) == (not expected)

    def evict_and_check(self, num_pages: int, also_locked: Sequence[Prefix] = ()) -> None:
        locked = self.locked_prefixes() | self.with_shorter(also_locked)
        locked_pages = {self.cached[prefix] for prefix in locked}
        evictable = [
            page
            for page in self.cached.values()
            if self.pool.ref_count(page) == 1 and page not in locked_pages
        ]
        assert self.cache.num_evictable_pages == len(evictable)
        freed_now = self.cache.evict(num_pages)
        assert min(num_pages, len(evictable)) <= freed_now <= len(evictable)
        remaining = self.tree_contents()
        assert remaining.items() <= self.cached.items()
        if not freed_now:
            assert remaining == self.cached, "evicted nodes without freeing a page"
        assert locked <= remaining.keys()
        self.cached = remaining

    def locked_prefixes(self) -> set[Prefix]:
        return self.with_shorter(
            (r.namespace, r.cached_prefix) for r in self.running if r.node is not None
        )

    @staticmethod
    def with_shorter(prefixes: Iterable[Prefix]) -> set[Prefix]:
        return {
            (ns, tokens[: k * SIM_PAGE])
            for ns, tokens in prefixes
            for k in range(1, len(tokens) // SIM_PAGE + 1)
        }

    def tree_contents(self) -> dict[Prefix, int]:
        contents: dict[Prefix, int] = {}
        stack = [(node, ()) for node in self.cache.root.children.values()]
        while stack:
            node, before = stack.pop()
            for k, page in enumerate(node.page_ids, start=1):
                contents[(node.namespace, before + node.key[: k * SIM_PAGE])] = page
            stack.extend((child, before + node.key) for child in node.children.values())
        return contents


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_prefix_cache_random_operations = PrefixCacheMachine.TestCase
