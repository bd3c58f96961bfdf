"""The prefix cache with state checkpoints (hybrid models) against real Page and State pools."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sluice.engine.cache_manager import PagePool
from sluice.engine.prefix_cache import PrefixCache, RadixNode
from sluice.engine.state_pool import StateOp, StatePool

PAGE = 2


def make_cache(num_pages: int = 32, num_slots: int = 8) -> tuple[PagePool, StatePool, PrefixCache]:
    pages, slots = PagePool(num_pages), StatePool(num_slots)
    return pages, slots, PrefixCache(pages, PAGE, slots)


def finish(
    pages: PagePool, slots: StatePool, cache: PrefixCache, tokens: list[int], checkpoint: bool
) -> RadixNode:
    """A request computed `tokens` (whole pages) in its own pages and slot, then finished."""
    own_pages, own_slot = pages.allocate(len(tokens) // PAGE), slots.allocate()
    node = cache.insert(tokens, own_pages)
    if checkpoint:
        cache.add_checkpoint(node, own_slot)
    pages.release(own_pages)
    slots.free(own_slot)
    return node


def test_match_ends_at_the_deepest_checkpoint_and_reports_the_kv_depth():
    pages, slots, cache = make_cache()
    shallow = finish(pages, slots, cache, [1, 1, 2, 2], checkpoint=True)
    finish(pages, slots, cache, [1, 1, 2, 2, 3, 3, 4, 4], checkpoint=False)
    hit = cache.match([1, 1, 2, 2, 3, 3, 4, 4, 5])
    assert hit.node is shallow and hit.num_tokens == 4 and hit.num_kv_tokens == 8
    assert hit.checkpoint == shallow.state_checkpoint
    assert hit.page_ids == cache.prefix_pages(shallow)
    cache.check_integrity()


def test_no_checkpoint_on_the_path_means_start_from_scratch():
    pages, slots, cache = make_cache()
    finish(pages, slots, cache, [1, 1, 2, 2], checkpoint=False)
    hit = cache.match([1, 1, 2, 2, 3])
    assert hit.node is cache.root and hit.num_tokens == 0 and hit.checkpoint is None
    assert hit.num_kv_tokens == 4


def test_add_checkpoint_queues_a_copy_from_the_request_slot():
    pages, slots, cache = make_cache()
    own_pages, own_slot = pages.allocate(1), slots.allocate()
    node = cache.insert([1, 1], own_pages)
    slots.take_ops()
    assert cache.add_checkpoint(node, own_slot)
    assert slots.take_ops() == [StateOp(own_slot, node.state_checkpoint)]
    assert cache.add_checkpoint(node, own_slot)  # already there: nothing copied again
    assert slots.take_ops() == [] and cache.num_checkpoints == 1


def test_a_split_keeps_the_checkpoint_on_the_deeper_half():
    pages, slots, cache = make_cache()
    deep = finish(pages, slots, cache, [1, 1, 2, 2, 3, 3], checkpoint=True)
    hit = cache.match([1, 1, 2, 2, 9])  # splits `deep` after two pages
    assert hit.node is cache.root and hit.num_kv_tokens == 4  # the front half has no state
    assert deep.state_checkpoint is not None and deep.key == (3, 3)
    assert cache.match([1, 1, 2, 2, 3, 3, 9]).node is deep
    cache.check_integrity()


def test_checkpoints_are_evicted_lru_when_slots_run_out_and_leave_tombstones():
    pages, slots, cache = make_cache(num_slots=3)  # two checkpoints and the running request
    first = finish(pages, slots, cache, [1, 1], checkpoint=True)
    second = finish(pages, slots, cache, [2, 2], checkpoint=True)
    cache.match([1, 1, 0])  # `first` is now the more recently used checkpoint
    third = finish(pages, slots, cache, [3, 3], checkpoint=True)
    assert second.state_checkpoint is None and second.parent is not None  # a tombstone
    assert first.state_checkpoint is not None and third.state_checkpoint is not None
    assert cache.match([2, 2, 0]).num_tokens == 0  # KV alone is not enough
    assert cache.num_cached_pages == 3
    cache.check_integrity()


def test_checkpoints_of_locked_nodes_can_be_evicted_but_keep_is_spared():
    pages, slots, cache = make_cache(num_slots=3)
    locked = finish(pages, slots, cache, [1, 1], checkpoint=True)
    cache.lock(locked)
    spared = finish(pages, slots, cache, [2, 2], checkpoint=True)
    assert cache.evict_checkpoints(1, keep=spared) == 1
    assert locked.state_checkpoint is None and spared.state_checkpoint is not None
    assert cache.evict_checkpoints(5, keep=spared) == 0
    cache.unlock(locked)
    cache.check_integrity()


def test_kv_eviction_drops_the_checkpoint_with_the_node():
    pages, slots, cache = make_cache(num_slots=3)
    finish(pages, slots, cache, [1, 1, 2, 2], checkpoint=True)
    assert slots.num_free == 2
    assert cache.evict(2) == 2
    assert slots.num_free == 3 and cache.num_checkpoints == 0
    cache.check_integrity()


def test_reset_frees_every_unlocked_checkpoint():
    pages, slots, cache = make_cache(num_slots=3)
    finish(pages, slots, cache, [1, 1], checkpoint=True)
    finish(pages, slots, cache, [2, 2, 3, 3], checkpoint=True)
    cache.reset()
    assert slots.num_free == 3 and pages.num_free == 32


def test_add_checkpoint_gives_up_when_every_slot_is_held_by_requests():
    pages, slots, cache = make_cache(num_slots=1)
    own_pages, own_slot = pages.allocate(1), slots.allocate()
    node = cache.insert([1, 1], own_pages)
    assert not cache.add_checkpoint(node, own_slot)
    assert node.state_checkpoint is None and cache.num_checkpoints == 0


def _free_a_checkpoint_slot(slots: StatePool, cache: PrefixCache) -> None:
    slots.free(next(iter(cache._checkpoints)).state_checkpoint)


def _share_a_slot(slots: StatePool, cache: PrefixCache) -> None:
    a, b = list(cache._checkpoints)
    b.state_checkpoint = a.state_checkpoint


def _forget_the_index(slots: StatePool, cache: PrefixCache) -> None:
    cache._checkpoints.clear()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_free_a_checkpoint_slot, "is free in the pool"),
        (_share_a_slot, "is in nodes"),
        (_forget_the_index, "disagree with the checkpoint index"),
    ],
)
def test_check_integrity_catches(corrupt: Callable[[StatePool, PrefixCache], None], message: str):
    pages, slots, cache = make_cache()
    finish(pages, slots, cache, [1, 1], checkpoint=True)
    finish(pages, slots, cache, [2, 2], checkpoint=True)
    cache.check_integrity()
    corrupt(slots, cache)
    with pytest.raises(AssertionError, match=message):
        cache.check_integrity()


# --- random sequences against a model ---------------------------------------------------------

SIM_PAGES, SIM_SLOTS = 20, 5


class HybridCacheMachine(RuleBasedStateMachine):
    """Requests take a slot, match (deepest checkpoint), compute, insert, checkpoint, extend their
    prefix below their node (moving the lock down) and finish, while KV and checkpoint evictions
    interleave. The model: the set of cached prefixes, which
    of them hold a checkpoint, and the slots running requests hold."""

    def __init__(self) -> None:
        super().__init__()
        self.pages, self.slots = PagePool(SIM_PAGES), StatePool(SIM_SLOTS)
        self.cache = PrefixCache(self.pages, PAGE, self.slots)
        self.running: list[tuple[RadixNode, list[int], int]] = []  # locked node, pages, slot

    tokens = st.lists(st.integers(0, 2), min_size=1, max_size=9)

    @precondition(lambda self: len(self.running) < 3)
    @rule(tokens=tokens, checkpoint=st.booleans())
    def admit_and_compute(self, tokens: list[int], checkpoint: bool) -> None:
        hit = self.cache.match(tokens)
        self.check_hit(tokens, hit)
        if self.slots.num_free == 0:
            self.cache.evict_checkpoints(1, keep=hit.node)
        missing = -(-len(tokens) // PAGE) - len(hit.page_ids)
        self.pages.retain(hit.page_ids)
        self.cache.lock(hit.node)
        if self.pages.num_free < missing:
            self.cache.evict(missing - self.pages.num_free)
        if self.slots.num_free == 0 or self.pages.num_free < missing:
            self.cache.unlock(hit.node)
            self.pages.release(hit.page_ids)
            return
        slot = self.slots.allocate()
        page_ids = hit.page_ids + self.pages.allocate(missing)
        full = len(tokens) // PAGE
        node = self.cache.insert(tokens[: full * PAGE], page_ids[:full])
        if checkpoint and full:
            self.cache.add_checkpoint(node, slot)
        self.cache.lock(node)
        self.cache.unlock(hit.node)
        self.running.append((node, page_ids, slot))

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 10), suffix=tokens, checkpoint=st.booleans())
    def extend(self, pick: int, suffix: list[int], checkpoint: bool) -> None:
        """A running request computes more whole pages, as `cache_computed` caches them."""
        index = pick % len(self.running)
        node, page_ids, slot = self.running[index]
        num_pages = len(suffix) // PAGE
        if self.pages.num_free < num_pages:
            self.cache.evict(num_pages - self.pages.num_free)
        if self.pages.num_free < num_pages:
            return
        own = self.pages.allocate(num_pages)
        deeper = self.cache.insert(suffix[: num_pages * PAGE], own, after=node)
        tree_pages = self.cache.prefix_pages(deeper, after=node)
        for mine, tree_page in zip(own, tree_pages):
            if mine != tree_page:
                self.pages.retain([tree_page])
                self.pages.release([mine])
        if checkpoint and num_pages:
            self.cache.add_checkpoint(deeper, slot)
        self.cache.move_lock(node, deeper)
        self.running[index] = (deeper, page_ids + tree_pages, slot)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 10))
    def finish(self, pick: int) -> None:
        node, page_ids, slot = self.running.pop(pick % len(self.running))
        self.cache.unlock(node)
        self.pages.release(page_ids)
        self.slots.free(slot)

    @rule(num_pages=st.integers(0, SIM_PAGES))
    def evict_pages(self, num_pages: int) -> None:
        self.cache.evict(num_pages)

    @rule(num_slots=st.integers(0, SIM_SLOTS))
    def evict_checkpoints(self, num_slots: int) -> None:
        before = self.cache.num_checkpoints
        freed = self.cache.evict_checkpoints(num_slots)
        assert freed == min(num_slots, before) and self.cache.num_checkpoints == before - freed

    @rule()
    def reset(self) -> None:
        self.cache.reset()

    @invariant()
    def slots_are_held_by_exactly_one_owner(self) -> None:
        self.cache.check_integrity()
        owned = [slot for _, _, slot in self.running] + [
            node.state_checkpoint for node in self.cache._checkpoints
        ]
        assert len(owned) == len(set(owned)) == SIM_SLOTS - self.slots.num_free

    def check_hit(self, tokens: list[int], hit) -> None:
        """The hit ends at a checkpoint (or the root), covers whole pages, leaves a token."""
        assert hit.num_tokens <= hit.num_kv_tokens <= len(tokens) - 1
        assert hit.num_tokens % PAGE == 0 and len(hit.page_ids) * PAGE == hit.num_tokens
        if hit.num_tokens:
            assert hit.checkpoint == hit.node.state_checkpoint is not None
            assert self.cache.prefix_pages(hit.node) == hit.page_ids

    def teardown(self) -> None:
        while self.running:
            self.finish(0)
        self.cache.reset()
        assert self.slots.num_free == SIM_SLOTS and self.pages.num_free == SIM_PAGES


TestHybridCacheMachine = HybridCacheMachine.TestCase
TestHybridCacheMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
