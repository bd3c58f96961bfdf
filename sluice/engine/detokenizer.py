"""Turn generated token ids into text deltas as they arrive, for streaming.

A token may hold only part of a character (the first bytes of an emoji, one `<0xNN>` byte-fallback
token), and decoding a single token can lose context (SentencePiece strips the first token's
leading space). So each step decodes a short window: the tokens last emitted, as context, plus the
ones not yet emitted, and emits what the new tokens add once that text is final:

- it does not end in U+FFFD, the mark of an unfinished character;
- the last token is not a byte-fallback byte: decoding renders a run of those as one, and a later
  bad byte would turn the whole run, already shown, into U+FFFDs;
- the last token is not a skipped special token, which decoding removes, joining the bytes on
  either side of it.

`tokenizers.decoders.DecodeStream` works the same way, but holds a trailing U+FFFD forever: it has
no flush, so a reply ending in an invalid byte, or in a real U+FFFD, loses its last character.
"""

from __future__ import annotations

from sluice.loaders.tokenizer import Tokenizer

_UNFINISHED = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one sequence; all deltas plus `flush()` equal `tokenizer.decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # the last emitted tokens, then the pending ones
        self._emitted_count = 0  # how many tokens at the start of the window were emitted
        self._emitted_text = ""  # the window's emitted tokens decoded

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", or several tokens'
        worth once a character split across them is whole)."""
        self._window.append(token_id)
        if self._may_change_text_before_it(token_id):
            return ""
        text = self._decode(self._window)
        if len(text) <= len(self._emitted_text) or text.endswith(_UNFINISHED):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back at the end of generation, invalid bytes shown as U+FFFD."""
        text = self._decode(self._window)
        if len(text) <= len(self._emitted_text):
            return ""
        return self._emit(text)

    def _may_change_text_before_it(self, token_id: int) -> bool:
        if self._tokenizer.is_fallback_byte(token_id):
            return True
        return self._skip_special_tokens and self._tokenizer.is_special(token_id)

    def _emit(self, text: str) -> str:
        delta = text[len(self._emitted_text) :]
        # The tokens just emitted become the next window's context; older ones are not needed.
        self._window = self._window[self._emitted_count :]
        self._emitted_count = len(self._window)
        self._emitted_text = self._decode(self._window)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
