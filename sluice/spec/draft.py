"""Draft-model proposals: a smaller model (or the target's own weights at 4 bits) decodes k
tokens greedily for every ready request, and the target verifies them.

The draft runs through the engine's own machinery: a `ModelRunner` over its own KV cache, fed
`StepInput`s, with its own page pool. Each step of it serves every request at once: first one
step that catches each request up on the tokens the draft has not seen (its prompt the first
time, later the target's accepted drafts and the token after them), whose last row gives the
first draft; then one decode step per further draft position.

Per request the draft keeps how many of its tokens are in its cache. The drafts it computed
(all but the last) are in its cache too, so at the next proposal it keeps those the request's
tokens confirmed and forgets the rest (their pages go back to its pool): the same roll-back as
the target's. A request that finishes or is preempted gives all its pages back.

Greedy drafts are one-hot proposals, so the target's rule (keep a draft while it equals the
token sampled before it) is exact rejection sampling: see `Scheduler.update`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sluice.config import EngineConfig
from sluice.engine.cache_manager import PagePool, pages_for, truncate_pages
from sluice.engine.model_runner import ModelRunner
from sluice.engine.request import Request
from sluice.engine.step import SamplingRow, ScheduledRequest, StepInput
from sluice.models.registry import LoadedModel
from sluice.sampling_params import SamplingParams
from sluice.spec.draft_model import load_draft
from sluice.spec.proposer import Proposer

logger = logging.getLogger(__name__)

_GREEDY = SamplingRow(SamplingParams(), [], [])


@dataclass
class _DraftSequence:
    """One request's tokens in the draft's cache: `num_computed` of them, on `page_ids`; the last
    `len(unconfirmed)` of those are drafts the target has not judged yet."""

    page_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    unconfirmed: list[int] = field(default_factory=list)


@dataclass
class _Chunk:
    """Tokens a step feeds one sequence; `sample`: its last row drafts the next token."""

    request_id: str
    sequence: _DraftSequence
    token_ids: list[int]
    sample: bool


class DraftProposer(Proposer):
    def __init__(
        self, runner: ModelRunner, pool: PagePool, max_positions: int, max_step_tokens: int
    ) -> None:
        """`max_positions`: the draft's context (longer requests get no drafts);
        `max_step_tokens`: the most tokens one catch-up step computes."""
        self.runner = runner
        self.pool = pool
        self.page_size = runner.page_size
        self.max_positions = max_positions
        self.max_step_tokens = max_step_tokens
        self._sequences: dict[str, _DraftSequence] = {}

    @classmethod
    def build(cls, config: EngineConfig, target: LoadedModel, num_pages: int) -> DraftProposer:
        """The draft for an engine over `target` with `num_pages` KV pages: its pool holds as
        many tokens, plus k drafts for each of `max_num_seqs` requests."""
        spec = config.speculative
        device = config.torch_device()
        dtype = config.torch_dtype(device)
        draft = load_draft(spec, target, config.quantization, device, dtype)
        page_size = config.cache.page_size
        draft_pages = num_pages + config.scheduler.max_num_seqs * pages_for(
            spec.num_speculative_tokens, page_size
        )
        runner = ModelRunner(
            draft.model,
            device,
            dtype,
            config.cache.kv_dtype(dtype, device),
            draft_pages,
            page_size,
            compile=config.compile,
        )
        logger.info(
            "draft model %s%s: %d KV pages",
            draft.path.name,
            " (the target's weights)" if draft is target else "",
            draft_pages,
        )
        return cls(
            runner,
            PagePool(draft_pages),
            draft.config.max_position_embeddings,
            config.scheduler.max_num_batched_tokens,
        )

    @property
    def is_idle(self) -> bool:
        """No request is held and every page is free."""
        return not self._sequences and self.pool.num_free == self.pool.num_pages

    def propose(self, requests: list[Request], k: int) -> list[list[int]]:
        ready = [(r, s) for r in requests if (s := self._prepare(r, k)) is not None]
        if not ready:
            return [[] for _ in requests]
        drafts = {request_id: [token] for request_id, token in self._catch_up(ready).items()}
        for _ in range(k - 1):
            chunks = [_Chunk(r.request_id, s, drafts[r.request_id][-1:], True) for r, s in ready]
            for chunk, token in zip(chunks, self._run(chunks)):
                chunk.sequence.unconfirmed += chunk.token_ids
                drafts[chunk.request_id].append(token)
        return [drafts.get(r.request_id, []) for r in requests]

    def finished(self, request: Request) -> None:
        self._drop(request)

    def preempted(self, request: Request) -> None:
        self._drop(request)

    def _drop(self, request: Request) -> None:
        sequence = self._sequences.pop(request.request_id, None)
        if sequence is not None:
            self.pool.release(sequence.page_ids)

    def _prepare(self, request: Request, k: int) -> _DraftSequence | None:
        """The request's sequence rolled back to what the target confirmed, with pages for its
        tokens and k - 1 drafts; None (no drafts) where those do not fit."""
        sequence = self._sequences.setdefault(request.request_id, _DraftSequence())
        self._roll_back(sequence, request)
        num_tokens = request.num_tokens + k - 1
        needed = pages_for(num_tokens, self.page_size) - len(sequence.page_ids)
        if num_tokens > self.max_positions or needed > self.pool.num_free:
            return None
        sequence.page_ids += self.pool.allocate(max(0, needed))
        return sequence

    def _roll_back(self, sequence: _DraftSequence, request: Request) -> None:
        """Keep the drafts the request's tokens confirmed and at least its last token to compute
        (its logits give the first draft); give back the pages past them."""
        start = sequence.num_computed - len(sequence.unconfirmed)
        actual = request.token_ids(start, start + len(sequence.unconfirmed))
        kept = 0
        while kept < len(actual) and actual[kept] == sequence.unconfirmed[kept]:
            kept += 1
        sequence.num_computed = min(start + kept, request.num_tokens - 1)
        sequence.unconfirmed = []
        truncate_pages(self.pool, sequence.page_ids, sequence.num_computed, self.page_size)

    def _catch_up(self, ready: list[tuple[Request, _DraftSequence]]) -> dict[str, int]:
        """Compute every request's tokens the draft has not seen, at most `max_step_tokens` a
        step; each request's first draft comes from the step with its last token."""
        firsts: dict[str, int] = {}
        pending = ready
        while pending:
            chunks = self._catch_up_chunks(pending)
            firsts.update(zip([c.request_id for c in chunks if c.sample], self._run(chunks)))
            pending = [(r, s) for r, s in pending if s.num_computed < r.num_tokens]
        return firsts

    def _catch_up_chunks(self, pending: list[tuple[Request, _DraftSequence]]) -> list[_Chunk]:
        """The next catch-up step: the requests' missing tokens in order, within the budget."""
        chunks, budget = [], self.max_step_tokens
        for request, sequence in pending:
            if budget <= 0:
                break
            start = sequence.num_computed
            end = min(request.num_tokens, start + budget)
            tokens = request.token_ids(start, end)
            chunks.append(_Chunk(request.request_id, sequence, tokens, end == request.num_tokens))
            budget -= len(tokens)
        return chunks

    def _run(self, chunks: list[_Chunk]) -> list[int]:
        """One draft step: every chunk's tokens into its sequence's pages; the greedy next token
        of each chunk that samples, in order."""
        step = StepInput(
            [
                ScheduledRequest(
                    c.request_id,
                    c.token_ids,
                    c.sequence.num_computed,
                    c.sequence.page_ids,
                    sampling=_GREEDY if c.sample else None,
                )
                for c in chunks
            ]
        )
        sampled = self.runner.execute(step).sampled
        for chunk in chunks:
            chunk.sequence.num_computed += len(chunk.token_ids)
        return [sampled[c.request_id][0].token_id for c in chunks if c.sample]
