"""The interface every proposer implements, and the one the engine builds from its config."""

from __future__ import annotations

from abc import ABC, abstractmethod

from sluice.config import SpeculativeConfig
from sluice.engine.request import Request


class Proposer(ABC):
    """Guesses the tokens that follow each request's tokens (prompt + output so far).

    A proposer may keep state per request (an index over its tokens), keyed by request id and
    dropped in `finished`. Its drafts only change how fast a request goes, never what it
    produces: the target model's samples decide (see `Scheduler.update`)."""

    @abstractmethod
    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        """Up to `k` draft tokens for each request, in order (an empty list: no guess)."""

    @abstractmethod
    def finished(self, request: Request) -> None:
        """The request ended: forget what was kept for it (its own state, not what it taught)."""


def make_proposer(config: SpeculativeConfig) -> Proposer | None:
    if config.method is None:
        return None
    if config.method == "ngram":
        from sluice.spec.ngram import NgramProposer

        return NgramProposer(config.ngram_min, config.ngram_max)
    from sluice.spec.suffix import SuffixProposer

    return SuffixProposer()
