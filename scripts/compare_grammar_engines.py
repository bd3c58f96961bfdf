"""xgrammar vs llguidance on the default model's tokenizer: tokenizer-table build time, one JSON
schema's compile time, and the token mask's cost per token along a valid output.

    OMP_NUM_THREADS=1 python scripts/compare_grammar_engines.py

Prints one JSON line per engine. sluice uses xgrammar (sluice/structured/grammar.py); this
script is how that choice was made, kept so it can be made again.
"""

from __future__ import annotations

import json
import statistics
import time

import llguidance
import llguidance.torch
import xgrammar as xgr

from sluice.loaders.gguf_file import read_gguf
from sluice.loaders.model_path import resolve_model
from sluice.loaders.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
OUTPUT = {"name": "Alice Smith", "age": 33, "tags": ["a", "bc", "hello world"]}


def measure_xgrammar(tokenizer: Tokenizer, vocab: list[bytes], ids: list[int]) -> dict:
    start = time.perf_counter()
    info = xgr.TokenizerInfo(
        vocab,
        vocab_type=xgr.VocabType.RAW,
        vocab_size=len(vocab),
        stop_token_ids=sorted(tokenizer.eos_token_ids),
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, len(vocab))
    times = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - start)
        assert matcher.accept_token(token)
    return _record("xgrammar", table_s, compile_s, times)


def measure_llguidance(tokenizer: Tokenizer, vocab: list[bytes], ids: list[int]) -> dict:
    class Wrapped:  # llguidance's duck-typed tokenizer: token bytes, EOS and an encoder
        eos_token_id = min(tokenizer.eos_token_ids)
        bos_token_id = None
        tokens = vocab

        def __call__(self, text: str | bytes) -> list[int]:
            text = text.decode() if isinstance(text, bytes) else text
            return tokenizer.encode(text, add_special_tokens=False)

    start = time.perf_counter()
    ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    compile_s = time.perf_counter() - start
    bitmask = llguidance.torch.allocate_token_bitmask(1, len(vocab))
    times = []
    for token in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        times.append(time.perf_counter() - start)
        assert matcher.consume_token(token), matcher.get_error()
    return _record("llguidance", table_s, compile_s, times)


def _record(engine: str, table_s: float, compile_s: float, times: list[float]) -> dict:
    return {
        "engine": engine,
        "tokenizer_table_ms": table_s * 1e3,
        "schema_compile_ms": compile_s * 1e3,
        "mask_ms_mean": statistics.mean(times) * 1e3,
        "mask_ms_max": max(times) * 1e3,
        "tokens": len(times),
    }


def main() -> None:
    tokenizer = Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct")))
    vocab = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    ids = tokenizer.encode(json.dumps(OUTPUT), add_special_tokens=False)
    for measure in (measure_xgrammar, measure_llguidance, measure_xgrammar, measure_llguidance):
        print(json.dumps(measure(tokenizer, vocab, ids)), flush=True)


if __name__ == "__main__":
    main()
