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
checkpoint stays valid. A node's lock count counts the locks on it and below it, so an unlocked
node's subtree is unlocked. A request extending its prefix moves its lock down with `move_lock`:
the counts above its old node already include that lock, so only the new nodes change.

Work per step is that of the new pages, never of the context behind them. `insert(after=node)`
starts below the node a request holds, and the eviction accounting is kept as it changes instead
of being recounted from the tree:
- each node counts its freeable pages (those only the tree holds: the pool reports every page
  going from one holder to two and back), and the cache sums them over unlocked nodes, which is
  `num_evictable_pages`;
- unlocked leaves wait in a heap, those with freeable pages first, least recently used first
  within that. Entries go stale instead of being removed (a node's live entry is the one with its
  `lru_seq`), and the heap is rebuilt when stale entries outnumber live ones.

LRU uses a counter bumped once per `match`/`insert`. `match` stamps its whole path (it walks it
anyway), `insert` the nodes below `after`; a node's time only matters once it is a leaf, and a
removed leaf passes its time on to its parent, so a leaf is as recent as anything once below it.

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
# (class, last_access, serial, seq, node): class 0 frees pages, class 1 only leads toward some.
LruEntry = tuple[int, int, int, int, "RadixNode"]


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
    num_freeable: int = 0  # pages only the tree holds: evicting this node frees them
    lru_key: tuple[int, int] | None = None  # (class, last_access) while an unlocked leaf
    lru_seq: int = 0  # its live entry in the eviction heap (0: none)
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
        self._own_locks: dict[RadixNode, int] = {}  # locks held on each node itself
        self._page_nodes: list[RadixNode | None] = [None] * pool.num_pages  # who holds a page
        self._num_evictable_pages = 0  # freeable pages of unlocked nodes
        self._lru: list[LruEntry] = []  # unlocked leaves, a heap with stale entries
        self._lru_seq = 0
        self._num_lru_leaves = 0  # live entries
        self.root = self._new_node((), [], namespace="")
        pool.watch_sharing(self._on_sharing)

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

    def prefix_pages(self, node: RadixNode, after: RadixNode | None = None) -> list[int]:
        """The tree's pages for the prefix ending at `node`, root first; with `after` (a node
        above it), only those below `after`."""
        path = list(self._path_up(node, after))
        return [page for step in reversed(path) for page in step.page_ids]

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached_pages

    @property
    def num_evictable_pages(self) -> int:
        """Pages `evict` could free now."""
        return self._num_evictable_pages

    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoints)

    # --- locks -------------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        self._take_lock(node)
        for step in self._path_up(node):
            self._add_locks(step, 1)

    def unlock(self, node: RadixNode) -> None:
        self._drop_lock(node)
        for step in self._path_up(node):
            self._add_locks(step, -1)

    def move_lock(self, node: RadixNode, descendant: RadixNode) -> None:
        """Move one lock on `node` down to `descendant` (or `node` itself). The counts from `node`
        up already include it, so only the nodes below `node` are touched."""
        self._drop_lock(node)
        self._take_lock(descendant)
        for step in self._path_up(descendant, node):
            self._add_locks(step, 1)

    def _take_lock(self, node: RadixNode) -> None:
        assert node is self.root or node.parent is not None, "lock of an evicted node"
        self._own_locks[node] = self._own_locks.get(node, 0) + 1

    def _drop_lock(self, node: RadixNode) -> None:
        own = self._own_locks.get(node, 0)
        assert own > 0, f"unlock of node {node.serial} that holds no lock"
        if own == 1:
            del self._own_locks[node]
        else:
            self._own_locks[node] = own - 1

    def _add_locks(self, node: RadixNode, delta: int) -> None:
        was_locked = node.lock_count > 0
        node.lock_count += delta
        if was_locked != (node.lock_count > 0):
            self._num_evictable_pages += node.num_freeable if was_locked else -node.num_freeable
            self._refresh_lru(node)

    # --- insert ------------------------------------------------------------------------------

    def insert(
        self,
        token_ids: Sequence[int],
        page_ids: Sequence[int],
        namespace: str = "",
        after: RadixNode | None = None,
    ) -> RadixNode:
        """Cache full pages; returns the node ending exactly at the inserted prefix.

        With `after` (a node in the tree, such as the one a request holds locked) the pages
        continue `after`'s prefix, and only the walk below it is paid for.
        """
        tokens = tuple(token_ids)
        assert len(tokens) == len(page_ids) * self.page_size, (
            f"insert needs whole pages: {len(tokens)} tokens for {len(page_ids)} pages "
            f"of {self.page_size}"
        )
        if after is None or after is self.root:
            after = self.root
            start = self._namespace_node(namespace) if page_ids else self.root
        else:
            assert after.parent is not None and after.namespace == namespace, (
                f"insert after node {after.serial}, evicted or of another namespace"
            )
            start = after
        if not page_ids:
            return after
        node = start
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
        self._touch(node, after)
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
        kept: list[LruEntry] = []  # leaves whose removal would lead to no freeable page
        while self._lru and self.pool.num_free - free_before < num_pages:
            entry = heapq.heappop(self._lru)
            cls, _, _, seq, node = entry
            if seq != node.lru_seq:
                continue  # stale
            if cls and not self._has_freeable_unlocked_ancestor(node):
                kept.append(entry)
                continue
            self._remove_leaf(node)  # may put its parent, now a leaf, on the heap
        for entry in kept:
            heapq.heappush(self._lru, entry)
        return self.pool.num_free - free_before

    def reset(self) -> None:
        """Release the tree's references on every unlocked node; locked paths stay."""
        for top in list(self._unlocked_subtree_roots()):
            for node in reversed(list(self._subtree(top))):  # children before their parent
                self._remove_leaf(node)

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
        self._check_page_counts(len(seen_pages))
        stray = [node.serial for node in self._own_locks if node not in reachable]
        assert not stray, f"locked nodes {stray} are no longer in the tree"
        self._check_lock_counts(root)
        self._check_evictable(reachable)
        self._check_lru(reachable)
        self._check_checkpoints(reachable)

    def _check_page_counts(self, num_pages: int) -> None:
        assert num_pages == self._num_cached_pages, (
            f"tree holds {num_pages} pages, num_cached_pages says {self._num_cached_pages}"
        )
        mapped = sum(node is not None for node in self._page_nodes)
        assert mapped == num_pages, f"{mapped} pages map to nodes, the tree holds {num_pages}"

    def _check_evictable(self, reachable: set[RadixNode]) -> None:
        """After `_check_page_node` verified each node's freeable count against the pool."""
        evictable = sum(node.num_freeable for node in reachable if not node.lock_count)
        assert evictable == self._num_evictable_pages, (
            f"unlocked nodes hold {evictable} freeable pages, num_evictable_pages says "
            f"{self._num_evictable_pages}"
        )

    def _check_lru(self, reachable: set[RadixNode]) -> None:
        """Every unlocked leaf, and no other node, has a live heap entry (the one with its
        `lru_seq`) holding its current key; the live count agrees; the heap is ordered."""
        live = {entry[-1]: entry for entry in self._lru if entry[3] == entry[-1].lru_seq}
        for node in reachable:
            key = self._lru_key(node)
            assert node.lru_key == key, (
                f"node {node.serial}: LRU key {node.lru_key}, expected {key}"
            )
            entry = live.pop(node, None)
            assert (entry is None) == (key is None), (
                f"node {node.serial}: LRU entry {entry and entry[:4]} for key {key}"
            )
            assert entry is None or entry[:3] == (*key, node.serial), (
                f"node {node.serial}: LRU entry {entry[:4]} for key {key}"
            )
        assert not live, f"LRU entries for nodes {[n.serial for n in live]} not in the tree"
        leaves = sum(node.lru_key is not None for node in reachable)
        assert leaves == self._num_lru_leaves, (
            f"{leaves} evictable leaves, the LRU counts {self._num_lru_leaves}"
        )
        heap = self._lru
        for i in range(1, len(heap)):
            assert heap[(i - 1) // 2][:4] <= heap[i][:4], "the LRU heap is out of order"

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
            assert self._page_nodes[page] is node, (
                f"page {page} of node {node.serial} maps elsewhere"
            )
        freeable = self._count_freeable(node.page_ids)
        assert node.num_freeable == freeable, (
            f"node {node.serial} counts {node.num_freeable} freeable pages, the pool says {freeable}"
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
        """The new leaf goes on the LRU heap when `insert` stamps it. None of its pages is
        freeable: the caller still holds them all."""
        pages = list(page_ids[start_page:])
        self.pool.retain(pages)
        self._num_cached_pages += len(pages)
        leaf = self._new_node(tokens[start_page * self.page_size :], pages, parent.namespace)
        self._map_pages(leaf)
        leaf.parent = parent
        parent.children[self._page_at(tokens, start_page)] = leaf
        self._refresh_lru(parent)
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
        front.num_freeable = self._count_freeable(front.page_ids)
        node.num_freeable -= front.num_freeable
        self._map_pages(front)
        front.parent = parent
        parent.children[front.key[: self.page_size]] = front
        node.key = node.key[cut:]
        node.page_ids = node.page_ids[num_pages:]
        node.parent = front
        front.children[node.key[: self.page_size]] = node
        self._refresh_lru(node)  # fewer freeable pages may change its class
        return front

    def _remove_leaf(self, node: RadixNode) -> None:
        """Remove an unlocked leaf; its parent inherits its access time (see the module doc)
        and, left without children, becomes a leaf itself or, a namespace node, goes too."""
        parent = node.parent
        assert parent is not None and not node.children and node.lock_count == 0
        del parent.children[node.key[: self.page_size]]
        node.parent = None
        self._refresh_lru(node)
        if node.state_checkpoint is not None:
            self.drop_checkpoint(node)
        self._num_evictable_pages -= node.num_freeable
        for page in node.page_ids:
            self._page_nodes[page] = None  # before the release: no sharing reports for it
        self.pool.release(node.page_ids)
        self._num_cached_pages -= len(node.page_ids)
        parent.last_access = max(parent.last_access, node.last_access)
        if parent.parent is self.root and not parent.children and not parent.lock_count:
            del self.root.children[parent.namespace]  # an empty namespace holds nothing
        else:
            self._refresh_lru(parent)

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

    def _touch(self, node: RadixNode, until: RadixNode | None = None) -> None:
        """Stamp `node` and its ancestors below `until`; only `node` can be a leaf among them."""
        self._clock += 1
        for step in self._path_up(node, until):
            step.last_access = self._clock
        self._refresh_lru(node)

    @staticmethod
    def _path_up(node: RadixNode, until: RadixNode | None = None) -> Iterator[RadixNode]:
        """`node` and its ancestors below `until` (an ancestor of `node`; None: up to the root)."""
        step: RadixNode | None = node
        while step is not until:
            assert step is not None, "walked past the root: `until` is not an ancestor"
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

    def _map_pages(self, node: RadixNode) -> None:
        for page in node.page_ids:
            self._page_nodes[page] = node

    def _count_freeable(self, pages: list[int]) -> int:
        return sum(1 for page in pages if self.pool.ref_count(page) == 1)

    def _on_sharing(self, page: int, shared: bool) -> None:
        """The pool's report that a page gained a second holder or lost it."""
        node = self._page_nodes[page]
        if node is None:
            return  # not the tree's
        delta = -1 if shared else 1
        node.num_freeable += delta
        if not node.lock_count:
            self._num_evictable_pages += delta
            self._refresh_lru(node)

    def _lru_key(self, node: RadixNode) -> tuple[int, int] | None:
        """Where an unlocked leaf goes in the eviction order; None for any other node."""
        if node.lock_count or node.children or not node.page_ids or node.parent is None:
            return None
        return (0 if node.num_freeable else 1, node.last_access)

    def _refresh_lru(self, node: RadixNode) -> None:
        """Give `node` a heap entry matching its current key, or none; old entries go stale."""
        key = self._lru_key(node)
        if key == node.lru_key:
            return
        self._num_lru_leaves += (key is not None) - (node.lru_key is not None)
        node.lru_key = key
        node.lru_seq = 0
        if key is None:
            return
        self._lru_seq += 1
        node.lru_seq = self._lru_seq
        heapq.heappush(self._lru, (*key, node.serial, self._lru_seq, node))
        if len(self._lru) > 2 * self._num_lru_leaves + 64:
            self._lru = [entry for entry in self._lru if entry[3] == entry[-1].lru_seq]
            heapq.heapify(self._lru)

    @staticmethod
    def _has_freeable_unlocked_ancestor(node: RadixNode) -> bool:
        """Whether removing `node` leads toward pages that free. Walks up, but only for leaves
        that free nothing themselves: pages a request holds without a lock on them, which the
        engine never does (its requests lock every cached page they hold)."""
        ancestor = node.parent
        while ancestor is not None and ancestor.page_ids and not ancestor.lock_count:
            if ancestor.num_freeable:
                return True
            ancestor = ancestor.parent
        return False
