"""A page-granular radix tree over token ids: finished prefixes' KV pages, kept for reuse. No torch.

Shape. The root's children are one empty node per namespace (a `cache_salt`, an adapter name):
the same tokens under two namespaces never meet. Below that every node's key is a whole number of
pages of tokens, its `page_ids` hold their KV, and a parent's children are keyed by the tuple of
their first page's tokens, so one step down the tree costs one page of hashing.

Page references (the pool counts them; see `PagePool`):
- The tree owns exactly one reference on every page it holds. `insert` retains each page it
  newly takes; for a prefix it already holds it keeps its own pages and takes nothing, so the
  caller's duplicates stay the caller's, to release with the rest of its page table.
- `match` neither retains nor locks. A request that uses the matched pages retains them itself
  (right away, before anything can call `evict`) and releases them with its own pages, so one
  rule frees a request's page table: release every page in it.
- A page therefore returns to the free list only when both the tree has evicted it and no request
  holds it. `evict` counts only pages that actually reached the free list.

Locks protect tree nodes, not pages: a locked node (and so its whole path to the root) is never
evicted, so a running request's prefix stays matchable and, for hybrid models, its state
checkpoint stays valid. Lock counts run up the path, so an unlocked node's subtree is unlocked.

LRU uses a counter bumped once per `match`/`insert`; every node on the touched path gets the same
tick, so a parent is never older than its children and eviction order is deterministic.

Hybrid models (recurrent layers beside attention), in the spirit of SGLang's MambaRadixCache.
A recurrent state cannot be rolled back to an earlier token, so KV pages alone cannot resume a
request: it also needs the state after the prefix's last token. A node may therefore hold a
state checkpoint (a slot of the `StatePool`, owned by the tree):
- `match` ends at the deepest node on the matched path that holds one and returns its slot; the
  caller copies it into the request's own slot (copy-on-match), so the request never writes into
  a checkpoint. `num_kv_tokens` says how far the KV alone matched: the caller can stop its first
  chunk there so the branch point gets a checkpoint too.
- `add_checkpoint` copies a request's state into a fresh slot on the node ending at the request's
  computed tokens (after a page-aligned prefill chunk, and at finish when aligned).
- Checkpoints have their own LRU order (touched when created or matched) and may be evicted from
  any node, locked or not; the node stays as a tombstone whose KV still serves deeper matches.
  Removing a node (KV eviction) drops its checkpoint with it. A split leaves the checkpoint on
  the deeper half, which still ends at the same token.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sluice.engine.cache_manager import PagePool
from sluice.engine.state_pool import StatePool

ChildKey = tuple[int, ...] | str  # first page's tokens below a namespace node, the namespace above


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]  # the tokens this node adds to its parent's prefix, whole pages
    page_ids: list[int]
    namespace: str
    serial: int  # creation order: breaks LRU ties deterministically
    parent: RadixNode | None = None
    children: dict[ChildKey, RadixNode] = field(default_factory=dict)
    lock_count: int = 0  # locks on this node plus every lock below it
    last_access: int = 0
    # Hybrid models: the state slot holding the recurrent state after this node's last token.
    state_checkpoint: int | None = None
    checkpoint_access: int = 0  # the checkpoints' own LRU clock


class MatchResult(NamedTuple):
    node: RadixNode  # deepest matched node (the root when nothing matched)
    page_ids: list[int]  # the KV pages holding the matched prefix, in order
    num_tokens: int  # == len(page_ids) * page_size
    checkpoint: int | None = None  # hybrid models: the state slot to copy (None: start from 0)
    num_kv_tokens: int = 0  # hybrid models: how far the KV pages alone matched


class PrefixCache:
    def __init__(self, pool: PagePool, page_size: int, state_pool: StatePool | None = None) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.pool = pool
        self.page_size = page_size
        self.state_pool = state_pool  # set for hybrid models: matches need a state checkpoint
        self._checkpoints: set[RadixNode] = set()
        self._serial = 0
        self._clock = 0
        self._num_cached_pages = 0
        self._own_locks: dict[RadixNode, int] = {}  # lock() calls not yet unlocked, per node
        self.root = self._new_node((), [], namespace="")

    # --- lookups -----------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], namespace: str = "") -> MatchResult:
        """Longest cached whole-page prefix, leaving at least the last token to compute; for
        hybrid models the longest one that also has a state checkpoint."""
        tokens = tuple(token_ids)
        max_pages = max(0, (len(tokens) - 1) // self.page_size)
        node = self.root.children.get(namespace)
        if node is None or max_pages == 0:
            return MatchResult(self.root, [], 0)
        page_ids: list[int] = []
        num_pages = 0
        while num_pages < max_pages:
            child = node.children.get(self._page_at(tokens, num_pages))
            if child is None:
                break
            matched = self._matching_pages(child, tokens, num_pages, max_pages)
            if matched < len(child.page_ids):
                child = self._split(child, matched)
            page_ids.extend(child.page_ids)
            num_pages += matched
            node = child
        self._touch(node)
        if self.state_pool is not None:
            return self._checkpointed_match(node, num_pages * self.page_size)
        if not page_ids:
            return MatchResult(self.root, [], 0)
        return MatchResult(node, page_ids, num_pages * self.page_size)

    def _checkpointed_match(self, node: RadixNode, num_kv_tokens: int) -> MatchResult:
        step = node
        while step.state_checkpoint is None and step.parent is not None:
            step = step.parent
        if step.state_checkpoint is None:
            return MatchResult(self.root, [], 0, None, num_kv_tokens)
        step.checkpoint_access = self._clock
        pages = self.prefix_pages(step)
        return MatchResult(
            step, pages, len(pages) * self.page_size, step.state_checkpoint, num_kv_tokens
        )

    def prefix_pages(self, node: RadixNode) -> list[int]:
        """The tree's pages for the whole prefix ending at `node`, root first."""
        path = list(self._path_to_root(node))
        return [page for step in reversed(path) for page in step.page_ids]

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached_pages

    @property
    def num_evictable_pages(self) -> int:
        """Pages `evict` could free now. Walks the tree: O(cached pages)."""
        return sum(
            self._freeable_pages(node)
            for top in self._unlocked_subtree_roots()
            for node in self._subtree(top)
        )

    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoints)

    # --- locks -------------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        assert node is self.root or node.parent is not None, "lock of an evicted node"
        self._own_locks[node] = self._own_locks.get(node, 0) + 1
        for step in self._path_to_root(node):
            step.lock_count += 1

    def unlock(self, node: RadixNode) -> None:
        own = self._own_locks.get(node, 0)
        assert own > 0, f"unlock of node {node.serial} that holds no lock"
        if own == 1:
            del self._own_locks[node]
        else:
            self._own_locks[node] = own - 1
        for step in self._path_to_root(node):
            step.lock_count -= 1

    # --- insert ------------------------------------------------------------------------------

    def insert(
        self, token_ids: Sequence[int], page_ids: Sequence[int], namespace: str = ""
    ) -> RadixNode:
        """Cache full pages; returns the node ending exactly at the inserted prefix."""
        tokens = tuple(token_ids)
        assert len(tokens) == len(page_ids) * self.page_size, (
            f"insert needs whole pages: {len(tokens)} tokens for {len(page_ids)} pages "
            f"of {self.page_size}"
        )
        if not page_ids:
            return self.root
        node = self._namespace_node(namespace)
        num_pages = 0
        while num_pages < len(page_ids):
            child = node.children.get(self._page_at(tokens, num_pages))
            if child is None:
                node = self._add_leaf(node, tokens, page_ids, num_pages)
                break
            matched = self._matching_pages(child, tokens, num_pages, len(page_ids))
            if matched < len(child.page_ids):
                child = self._split(child, matched)
            num_pages += matched
            node = child
        self._touch(node)
        return node

    # --- state checkpoints (hybrid models) ----------------------------------------------------

    def add_checkpoint(self, node: RadixNode, source_slot: int) -> bool:
        """Checkpoint the state in `source_slot` (after `node`'s last token) onto `node`.

        False when no slot is free even after evicting older checkpoints: caching is best effort.
        """
        assert self.state_pool is not None and node.page_ids, "checkpoints go on page nodes"
        self._clock += 1
        if node.state_checkpoint is None:
            if self.state_pool.num_free == 0:
                self.evict_checkpoints(1)
            if self.state_pool.num_free == 0:
                return False
            node.state_checkpoint = self.state_pool.allocate()
            self.state_pool.copy(source_slot, node.state_checkpoint)
            self._checkpoints.add(node)
        node.checkpoint_access = self._clock
        return True

    def evict_checkpoints(self, num_slots: int, keep: RadixNode | None = None) -> int:
        """Free up to `num_slots` checkpoints, least recently used first, sparing `keep`'s."""
        victims = heapq.nsmallest(
            num_slots,
            (n for n in self._checkpoints if n is not keep),
            key=lambda n: (n.checkpoint_access, n.serial),
        )
        for node in victims:
            self.drop_checkpoint(node)
        return len(victims)

    def drop_checkpoint(self, node: RadixNode) -> None:
        """Free `node`'s checkpoint; the node stays, a tombstone."""
        assert self.state_pool is not None and node.state_checkpoint is not None
        self.state_pool.free(node.state_checkpoint)
        node.state_checkpoint = None
        self._checkpoints.discard(node)

    # --- eviction ----------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Drop unlocked leaves, the ones that free pages first, LRU within that, until at least
        `num_pages` pages reached the free list or nothing useful is left. Returns pages freed
        (may exceed `num_pages`: a node goes as a whole)."""
        if num_pages <= 0:
            return 0
        free_before = self.pool.num_free
        candidates = [
            entry for leaf in self._unlocked_leaves() if (entry := self._eviction_entry(leaf))
        ]
        heapq.heapify(candidates)
        while candidates and self.pool.num_free - free_before < num_pages:
            node = heapq.heappop(candidates)[-1]
            parent = node.parent
            assert parent is not None
            self._remove_leaf(node)
            if parent.children or parent.lock_count:
                continue
            if parent.parent is self.root:
                del self.root.children[parent.namespace]  # an empty namespace holds nothing
            elif entry := self._eviction_entry(parent):
                heapq.heappush(candidates, entry)
        return self.pool.num_free - free_before

    def reset(self) -> None:
        """Release the tree's references on every unlocked node; locked paths stay."""
        for top in list(self._unlocked_subtree_roots()):
            for node in reversed(list(self._subtree(top))):  # children before their parent
                self._remove_leaf(node)
        for namespace, ns_node in list(self.root.children.items()):
            if not ns_node.children:
                del self.root.children[namespace]

    # --- integrity ---------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Rebuild the accounting from the tree and compare; AssertionError on any mismatch."""
        root = self.root
        assert root.parent is None and not root.key and not root.page_ids, "root must be empty"
        seen_pages: dict[int, RadixNode] = {}
        reachable: set[RadixNode] = {root}
        for namespace, ns_node in root.children.items():
            assert ns_node.parent is root, f"namespace {namespace!r}: parent is not the root"
            assert ns_node.namespace == namespace, (
                f"namespace node keyed {namespace!r} says {ns_node.namespace!r}"
            )
            assert not ns_node.key and not ns_node.page_ids, f"namespace {namespace!r} holds pages"
            assert ns_node.children, f"namespace {namespace!r} is empty and should be pruned"
            for node in self._subtree(ns_node):
                reachable.add(node)
                if node is not ns_node:
                    self._check_page_node(node, seen_pages)
                self._check_children(node)
        assert len(seen_pages) == self._num_cached_pages, (
            f"tree holds {len(seen_pages)} pages, num_cached_pages says {self._num_cached_pages}"
        )
        stray = [node.serial for node in self._own_locks if node not in reachable]
        assert not stray, f"locked nodes {stray} are no longer in the tree"
        self._check_lock_counts(root)
        self._check_checkpoints(reachable)

    def _check_checkpoints(self, reachable: set[RadixNode]) -> None:
        holders = {node for node in reachable if node.state_checkpoint is not None}
        assert holders == self._checkpoints, (
            f"nodes {sorted(n.serial for n in holders ^ self._checkpoints)} disagree with the "
            "checkpoint index"
        )
        slots: dict[int, RadixNode] = {}
        for node in holders:
            assert node.page_ids, f"node {node.serial} holds a checkpoint but no pages"
            other = slots.setdefault(node.state_checkpoint, node)
            assert other is node, (
                f"state slot {node.state_checkpoint} is in nodes {other.serial} and {node.serial}"
            )
            assert self.state_pool is not None and self.state_pool.is_allocated(
                node.state_checkpoint
            ), f"checkpoint slot {node.state_checkpoint} of node {node.serial} is free in the pool"

    def _check_page_node(self, node: RadixNode, seen_pages: dict[int, RadixNode]) -> None:
        assert node.page_ids, f"node {node.serial} holds no pages"
        assert len(node.key) == len(node.page_ids) * self.page_size, (
            f"node {node.serial}: {len(node.key)} tokens for {len(node.page_ids)} pages "
            f"of {self.page_size}"
        )
        for page in node.page_ids:
            other = seen_pages.setdefault(page, node)
            assert other is node, f"page {page} is in nodes {other.serial} and {node.serial}"
            assert self.pool.ref_count(page) >= 1, (
                f"page {page} of node {node.serial} is free in the pool"
            )

    def _check_children(self, node: RadixNode) -> None:
        for child_key, child in node.children.items():
            assert child.parent is node, f"node {child.serial}: wrong parent"
            assert child.namespace == node.namespace, f"node {child.serial}: wrong namespace"
            assert child_key == child.key[: self.page_size], (
                f"node {child.serial} keyed {child_key} but starts with {child.key[: self.page_size]}"
            )

    def _check_lock_counts(self, node: RadixNode) -> int:
        expected = self._own_locks.get(node, 0)
        for child in node.children.values():
            child_locks = self._check_lock_counts(child)
            assert node.lock_count >= child_locks, (
                f"node {node.serial} has {node.lock_count} locks, its child {child.serial} "
                f"{child_locks}"
            )
            expected += child_locks
        assert node.lock_count == expected, (
            f"node {node.serial} has lock count {node.lock_count}, lock/unlock calls imply {expected}"
        )
        return expected

    # --- tree surgery ------------------------------------------------------------------------

    def _new_node(self, key: tuple[int, ...], page_ids: list[int], namespace: str) -> RadixNode:
        self._serial += 1
        return RadixNode(key, page_ids, namespace, self._serial)

    def _namespace_node(self, namespace: str) -> RadixNode:
        node = self.root.children.get(namespace)
        if node is None:
            node = self._new_node((), [], namespace)
            node.parent = self.root
            self.root.children[namespace] = node
        return node

    def _add_leaf(
        self, parent: RadixNode, tokens: tuple[int, ...], page_ids: Sequence[int], start_page: int
    ) -> RadixNode:
        pages = list(page_ids[start_page:])
        self.pool.retain(pages)
        self._num_cached_pages += len(pages)
        leaf = self._new_node(tokens[start_page * self.page_size :], pages, parent.namespace)
        leaf.parent = parent
        parent.children[self._page_at(tokens, start_page)] = leaf
        return leaf

    def _split(self, node: RadixNode, num_pages: int) -> RadixNode:
        """Cut `node` after `num_pages` pages. The new node takes the front half and `node` keeps
        the back, so handles to `node` (locks held by requests) still end where they did."""
        cut = num_pages * self.page_size
        parent = node.parent
        assert parent is not None and 0 < num_pages < len(node.page_ids)
        front = self._new_node(node.key[:cut], node.page_ids[:num_pages], node.namespace)
        front.last_access = node.last_access
        front.lock_count = node.lock_count  # every lock below `node` passes through `front`
        front.parent = parent
        parent.children[front.key[: self.page_size]] = front
        node.key = node.key[cut:]
        node.page_ids = node.page_ids[num_pages:]
        node.parent = front
        front.children[node.key[: self.page_size]] = node
        return front

    def _remove_leaf(self, node: RadixNode) -> None:
        parent = node.parent
        assert parent is not None and not node.children and node.lock_count == 0
        del parent.children[node.key[: self.page_size]]
        node.parent = None
        if node.state_checkpoint is not None:
            self.drop_checkpoint(node)
        self.pool.release(node.page_ids)
        self._num_cached_pages -= len(node.page_ids)

    # --- helpers -----------------------------------------------------------------------------

    def _page_at(self, tokens: tuple[int, ...], page: int) -> tuple[int, ...]:
        return tokens[page * self.page_size : (page + 1) * self.page_size]

    def _matching_pages(
        self, node: RadixNode, tokens: tuple[int, ...], start_page: int, end_page: int
    ) -> int:
        """How many of `node`'s pages equal tokens' pages from `start_page` (before `end_page`)."""
        limit = min(len(node.page_ids), end_page - start_page)
        offset = start_page * self.page_size
        for page in range(limit):
            lo, hi = page * self.page_size, (page + 1) * self.page_size
            if node.key[lo:hi] != tokens[offset + lo : offset + hi]:
                return page
        return limit

    def _touch(self, node: RadixNode) -> None:
        self._clock += 1
        for step in self._path_to_root(node):
            step.last_access = self._clock

    @staticmethod
    def _path_to_root(node: RadixNode) -> Iterator[RadixNode]:
        step: RadixNode | None = node
        while step is not None:
            yield step
            step = step.parent

    @staticmethod
    def _subtree(top: RadixNode) -> Iterator[RadixNode]:
        """`top` and its descendants, every parent before its children."""
        stack = [top]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _unlocked_subtree_roots(self) -> Iterator[RadixNode]:
        """The highest unlocked page nodes; locks run up the path, so all below them is unlocked."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.lock_count or not node.page_ids:
                stack.extend(node.children.values())  # locked, or a namespace node
            else:
                yield node

    def _unlocked_leaves(self) -> Iterator[RadixNode]:
        for top in self._unlocked_subtree_roots():
            yield from (node for node in self._subtree(top) if not node.children)

    def _freeable_pages(self, node: RadixNode) -> int:
        return sum(1 for page in node.page_ids if self.pool.ref_count(page) == 1)

    def _eviction_entry(self, leaf: RadixNode) -> tuple[int, int, int, RadixNode] | None:
        """Heap entry: leaves that free pages first, then leaves whose removal moves toward an
        unlocked ancestor that does; leaves that lead to nothing freeable are kept."""
        if self._freeable_pages(leaf):
            return (0, leaf.last_access, leaf.serial, leaf)
        if self._has_freeable_unlocked_ancestor(leaf):
            return (1, leaf.last_access, leaf.serial, leaf)
        return None

    def _has_freeable_unlocked_ancestor(self, node: RadixNode) -> bool:
        ancestor = node.parent
        while ancestor is not None and ancestor.page_ids and not ancestor.lock_count:
            if self._freeable_pages(ancestor):
                return True
            ancestor = ancestor.parent
        return False
