"""Suffix decoding (SuffixDecoding, arXiv 2411.04975): drafts from suffix trees over the
request's own tokens and over the recent outputs of other requests.

A tree here is a depth-limited suffix trie with counts: every substring of at most `max_depth`
tokens of the sequences it was given is a path from the root, and a node counts how often its
substring occurred. To propose, the longest suffix of the request's tokens that the tree holds
is found (the match); from there the most frequent continuation is followed one child at a time,
while the running product of the children's frequency shares (the path's estimated probability)
stays at or above `min_token_prob`, and for at most `max_spec_factor` times the match length
tokens (a short match is weak evidence). Of the two trees' proposals the one with more expected
accepted tokens (the sum of the path's probabilities, the paper's score) is used.

The request's tree grows by `max_depth` node updates per token as its tokens arrive; the global
tree holds the outputs of the last `max_cached_outputs` finished requests, the oldest taken out
(its counts decremented) when a newer one comes in. Agentic and repetitive workloads, where
answers recur across requests, gain from the global tree what prompt lookup cannot see.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from sluice.engine.request import Request
from sluice.spec.proposer import RequestwiseProposer


@dataclass(eq=False)
class _Node:
    count: int = 0
    children: dict[int, _Node] = field(default_factory=dict)


class SuffixTree:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()

    def add(self, tokens: list[int]) -> None:
        """Count every substring of `tokens` up to the depth."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start : start + self.max_depth]:
                node = node.children.setdefault(token, _Node())
                node.count += 1

    def remove(self, tokens: list[int]) -> None:
        """Uncount what `add(tokens)` counted. A node whose count reaches 0 goes with its subtree:
        a substring's count bounds those of its extensions, so they are all 0 too."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start : start + self.max_depth]:
                child = node.children[token]
                child.count -= 1
                if child.count == 0:
                    del node.children[token]
                    break
                node = child

    def match(self, context: list[int]) -> tuple[_Node, int]:
        """The node of the longest suffix of `context` that the tree holds with a continuation,
        and its length (a request's own tree holds its tail, which nothing follows yet). A
        suffix of such a substring is one too, so lengths are tried upwards until one fails."""
        best, length = self.root, 0
        for n in range(1, min(len(context), self.max_depth - 1) + 1):
            node = self._find(context[-n:])
            if node is None or not node.children:
                break
            best, length = node, n
        return best, length

    def _find(self, tokens: list[int]) -> _Node | None:
        node = self.root
        for token in tokens:
            node = node.children.get(token)
            if node is None:
                return None
        return node


class _GrowingTree:
    """One request's tree, extended as its tokens arrive: the nodes of its current suffixes
    shorter than the depth are kept, so a token costs one child step for each."""

    def __init__(self, max_depth: int) -> None:
        self.tree = SuffixTree(max_depth)
        self.tokens: list[int] = []
        self._open: list[_Node] = []  # nodes of the suffixes of lengths 1 .. depth - 1

    def catch_up(self, request: Request) -> None:
        new = request.token_ids(len(self.tokens), request.num_tokens)
        self.tokens += new
        root, depth = self.tree.root, self.tree.max_depth
        for token in new:
            extended = []
            for node in [root, *self._open]:
                child = node.children.setdefault(token, _Node())
                child.count += 1
                extended.append(child)
            self._open = extended[: depth - 1]


@dataclass(frozen=True)
class _Proposal:
    tokens: list[int]
    score: float  # expected accepted tokens: the sum of the path's probabilities


class SuffixProposer(RequestwiseProposer):
    def __init__(
        self,
        max_depth: int = 24,
        max_cached_outputs: int = 256,
        min_token_prob: float = 0.1,
        max_spec_factor: float = 1.0,
    ) -> None:
        self.max_depth = max_depth
        self.min_token_prob = min_token_prob
        self.max_spec_factor = max_spec_factor
        self.global_tree = SuffixTree(max_depth)
        self._outputs: deque[list[int]] = deque()
        self._max_cached_outputs = max_cached_outputs
        self._trees: dict[str, _GrowingTree] = {}

    def finished(self, request: Request) -> None:
        self._trees.pop(request.request_id, None)
        if request.output_token_ids:
            self._remember(list(request.output_token_ids))

    def forget_outputs(self) -> None:
        self.global_tree = SuffixTree(self.max_depth)
        self._outputs.clear()

    def _remember(self, output: list[int]) -> None:
        self.global_tree.add(output)
        self._outputs.append(output)
        if len(self._outputs) > self._max_cached_outputs:
            self.global_tree.remove(self._outputs.popleft())

    def propose_one(self, request: Request, k: int) -> list[int]:
        own = self._trees.setdefault(request.request_id, _GrowingTree(self.max_depth))
        own.catch_up(request)
        context = own.tokens
        proposals = [self._follow(tree, context, k) for tree in (own.tree, self.global_tree)]
        return max(proposals, key=lambda p: p.score).tokens

    def _follow(self, tree: SuffixTree, context: list[int], k: int) -> _Proposal:
        node, length = tree.match(context)
        limit = min(k, math.ceil(self.max_spec_factor * length))
        tokens: list[int] = []
        probability, score = 1.0, 0.0
        while len(tokens) < limit:
            if not node.children:  # the depth limit: find the extended context's match again
                node, length = tree.match(context + tokens)
                if length == 0 or not node.children:
                    break
            total = sum(child.count for child in node.children.values())
            token, child = max(node.children.items(), key=lambda item: item[1].count)
            probability *= child.count / total
            if probability < self.min_token_prob:
                break
            tokens.append(token)
            score += probability
            node = child
        return _Proposal(tokens, score)
