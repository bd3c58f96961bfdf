"""What a step tells the caller about each request, and the text stream that builds it.

Text is decoded incrementally; stop strings are matched across token boundaries and never
emitted, so the stream holds back the last `len(longest stop) - 1` characters until it is sure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.engine.detokenizer import IncrementalDetokenizer
from sluice.engine.request import FinishReason, TokenLogprob
from sluice.loaders.tokenizer import Tokenizer
from sluice.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """One step's news for one sequence (one of a request's `n` samples)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    queue_time: float | None = None  # seconds from entering the engine to first being scheduled
    # A prefill instance's last output for a remote decode: where D finds the KV (sluice.disagg).
    kv_transfer_params: dict | None = None
    # With params.prompt_logprobs, in a sequence's first output: each prompt token's after the
    # first (the first has none: nothing comes before it).
    prompt_logprobs: list[TokenLogprob] | None = None
    # The engine gave up on this sequence (its prompt's KV transfer failed, for one): its last
    # output, which the caller raises instead of reading.
    error: Exception | None = None


class TextStream:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stops = params.stop
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self._emitted = 0

    def add_token(self, token_id: int) -> bool:
        """Append a token's text; True when a stop string completed (the text is cut before it)."""
        return self._extend(self._detokenizer.push(token_id))

    def finish(self) -> None:
        self._extend(self._detokenizer.flush())

    def take_delta(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _extend(self, new_text: str) -> bool:
        if not new_text:
            return False
        search_from = max(0, len(self.text) - self._holdback)
        self.text += new_text
        cut = min(
            (i for s in self._stops if (i := self.text.find(s, search_from)) >= 0), default=-1
        )
        if cut < 0:
            return False
        self.text = self.text[:cut]
        return True
