"""The interface every proposer implements, and the one the engine builds from its config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from sluice.config import EngineConfig
from sluice.engine.request import Request

if TYPE_CHECKING:
    from sluice.models.registry import LoadedModel


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

    def forget_outputs(self) -> None:  # noqa: B027 (a hook: most learn nothing across requests)
        """Forget what finished requests taught (suffix decoding's global tree), so that the
        next request is proposed for on first sight, as a fresh engine would."""

    def preempted(self, request: Request) -> None:  # noqa: B027 (a hook: most keep nothing)
        """The request was preempted (it will be computed again): free what it holds, such as
        a draft model's KV pages. Its tokens are unchanged, so an index over them may stay."""


class RequestwiseProposer(Proposer):
    """A proposer whose guess for a request depends on that request alone (n-gram, suffix
    decoding, replay): it proposes one request at a time."""

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        return [self.propose_one(request, k) for request in requests]

    @abstractmethod
    def propose_one(self, request: Request, k: int) -> list[int]:
        """Up to `k` draft tokens for `request`."""


def make_proposer(config: EngineConfig, target: LoadedModel, num_pages: int) -> Proposer | None:
    """The proposer for an engine over `target` whose KV pool has `num_pages` pages."""
    spec = config.speculative
    if spec.method is None:
        return None
    if spec.method == "ngram":
        from sluice.spec.ngram import NgramProposer

        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "suffix":
        from sluice.spec.suffix import SuffixProposer

        return SuffixProposer()
    from sluice.spec.draft import DraftProposer

    return DraftProposer.build(config, target, num_pages)
