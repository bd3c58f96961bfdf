"""Prompt lookup: the tokens that followed the last earlier occurrence of the context's tail.

For n from `max_n` down to `min_n`, the request's last n tokens are looked up among its earlier
n-grams; the first hit proposes the (up to k) tokens that followed it. Answers that copy from
their prompt (edits, quotes, extraction) or repeat themselves accept most of them.

Each request's n-grams are indexed as its tokens arrive (a dict from n-gram to where its latest
occurrence ended), so a lookup costs `max_n - min_n + 1` dict probes whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.engine.request import Request
from sluice.spec.proposer import RequestwiseProposer


@dataclass
class _NgramIndex:
    """Where the latest occurrence of each n-gram of one request's tokens ended."""

    tokens: list[int] = field(default_factory=list)
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    num_indexed: int = 0  # n-grams ending before this position are in `ends`

    def catch_up(self, request: Request, min_n: int, max_n: int) -> None:
        """Take the request's new tokens and index every n-gram that ends before its last token
        (the tail itself must not match itself)."""
        self.tokens += request.token_ids(len(self.tokens), request.num_tokens)
        for end in range(max(self.num_indexed, min_n), len(self.tokens)):
            for n in range(min_n, min(max_n, end) + 1):
                self.ends[tuple(self.tokens[end - n : end])] = end
        self.num_indexed = max(self.num_indexed, len(self.tokens))

    def lookup(self, min_n: int, max_n: int, k: int) -> list[int]:
        for n in range(min(max_n, len(self.tokens)), min_n - 1, -1):
            end = self.ends.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end : end + k]
        return []


class NgramProposer(RequestwiseProposer):
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._indexes: dict[str, _NgramIndex] = {}

    def finished(self, request: Request) -> None:
        self._indexes.pop(request.request_id, None)

    def propose_one(self, request: Request, k: int) -> list[int]:
        index = self._indexes.setdefault(request.request_id, _NgramIndex())
        index.catch_up(request, self.min_n, self.max_n)
        return index.lookup(self.min_n, self.max_n, k)
