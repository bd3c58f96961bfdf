"""A proposer that replays continuations known beforehand (from a run without speculation).

It measures what speculation can gain at most, every draft right, with no proposer's guesswork:
on the hybrids' tiny random checkpoints, which copy nothing, the n-gram proposer's drafts are
mostly wrong. With `wrong` set, its i-th proposal for a request has draft
(i + prompt length) % (k + 1) wrong (none when that is k), so verify steps accept every length
from 0 to k drafts in turn (the tests' use).
"""

from __future__ import annotations

from sluice.engine.request import Request
from sluice.spec.proposer import RequestwiseProposer


class ReplayProposer(RequestwiseProposer):
    def __init__(
        self, prompts: list[list[int]], outputs: list[list[int]], vocab_size: int, wrong: bool
    ) -> None:
        self.continuations = {tuple(p): o for p, o in zip(prompts, outputs)}
        self.vocab_size = vocab_size
        self.wrong = wrong
        self._num_proposed: dict[str, int] = {}

    def finished(self, request: Request) -> None:
        self._num_proposed.pop(request.request_id, None)

    def propose_one(self, request: Request, k: int) -> list[int]:
        done = len(request.output_token_ids)
        drafts = list(self.continuations[tuple(request.prompt_token_ids)][done : done + k])
        # Requests start the cycle at different points: with few tokens out, each sees some.
        count = self._num_proposed.get(request.request_id, request.num_prompt_tokens)
        self._num_proposed[request.request_id] = count + 1
        wrong = count % (k + 1)
        if self.wrong and wrong < len(drafts):
            drafts[wrong] = (drafts[wrong] + 1) % self.vocab_size
        return drafts
