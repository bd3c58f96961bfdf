"""Token masks from xgrammar: grammars compiled once per constraint, one matcher per request.

xgrammar was measured against llguidance on the default model (docs/benchmarks.md): its mask
costs ~0.015 ms per token against ~0.05 ms, both tiny beside a forward pass, so the mask is
computed on the engine's thread right before sampling. A matcher follows the tokens a request
commits and rolls back rejected speculative drafts.
"""

from __future__ import annotations

import functools
import json

import torch
import xgrammar as xgr

from sluice.loaders.tokenizer import Tokenizer
from sluice.sampling_params import InvalidParameterError
from sluice.structured.spec import StructuredOutput


class GrammarCompiler:
    """Compiles constraints for one tokenizer; compiled grammars are cached by constraint."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer

    @functools.cached_property
    def _compiler(self) -> xgr.GrammarCompiler:
        # Built on first use (~0.1 s): engines that never constrain never pay for it.
        tokenizer = self._tokenizer
        # Special tokens spell nothing (xgrammar never allows an empty token), or their text
        # (`<|im_end|>`) could be written inside a JSON string and vanish from the output.
        info = xgr.TokenizerInfo(
            [
                b"" if tokenizer.is_special(i) else tokenizer.token_bytes(i)
                for i in range(tokenizer.vocab_size)
            ],
            vocab_type=xgr.VocabType.RAW,
            vocab_size=self.vocab_size,
            stop_token_ids=sorted(tokenizer.eos_token_ids),
        )
        return xgr.GrammarCompiler(info, max_threads=1)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one compiler per engine, kept for its life
    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """Raises InvalidParameterError naming `spec.param` for a constraint that cannot compile."""
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidParameterError(
                spec.param, f"{spec.param}: cannot compile the {spec.kind} constraint: {exc}"
            ) from exc

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        # No free whitespace: a small model can otherwise pad a JSON value with newlines forever.
        if spec.kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "json_schema":
            return self._compiler.compile_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            return self._compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(choice) for choice in choices)
            )
        return self._compiler.compile_grammar(spec.value)

    def matcher(self, spec: StructuredOutput) -> GrammarState:
        return GrammarState(self.compile(spec), self.vocab_size)


class GrammarState:
    """Where one request is in its grammar: follows its committed tokens, masks the next one."""

    def __init__(self, grammar: xgr.CompiledGrammar, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(grammar)  # rolls back any number of tokens
        self._vocab_size = vocab_size
        self._num_accepted = 0
        self._broken = False  # a token the grammar refuses was forced on it (a rejected draft)

    def follow(self, history: list[int]) -> bool:
        """Move to just after `history`, which extends what was followed before: the request's
        output tokens, then the drafts checked after them. False when the grammar refuses a
        token of it: only a draft the model is about to reject can be such."""
        if self._broken:
            return False
        for token in history[self._num_accepted :]:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                self._broken = True
                return False
            self._num_accepted += 1
        return True

    def rollback_to(self, num_tokens: int) -> None:
        """Forget the tokens followed after the first `num_tokens` (drafts, once checked)."""
        if num_tokens < self._num_accepted:
            self._matcher.rollback(self._num_accepted - num_tokens)
            self._num_accepted = num_tokens
        self._broken = False

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of `bitmask` (int32 bits, as `allocate_bitmask`) allows the tokens the
        grammar takes next; once it is complete, only a stop token."""
        self._matcher.fill_next_token_bitmask(bitmask, row)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A bitmask allowing every token, rows to be narrowed by `GrammarState.fill_mask`."""
    return xgr.allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens' logits become -inf, in place."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
