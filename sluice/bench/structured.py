"""`sluice bench structured`: output tok/s of JSON-schema-constrained generation against
unconstrained, at each stream count, rounds interleaved (A B A B) on one engine; and the time
to compile a schema.

The schema asks for at least `MIN_ITEMS` objects, so no constrained request finishes before
`--max-tokens` and both sides generate exactly as many tokens (the unconstrained side ignores
EOS). Prints one JSON line per stream count.
"""

from __future__ import annotations

import argparse
import json
import time

from sluice.bench.inprocess import load_llm, record_header
from sluice.bench.report import emit
from sluice.sampling_params import SamplingParams
from sluice.structured.grammar import GrammarCompiler
from sluice.structured.spec import StructuredOutput

MIN_ITEMS = 64
SCHEMA = {
    "type": "array",
    "minItems": MIN_ITEMS,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "email", "tags"],
        "additionalProperties": False,
    },
}
PROMPT = "Write a JSON list of {} people, with names, ages, emails and tags:"


def main(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    compile_s = _compile_seconds(llm, spec)
    for streams in args.streams:
        prompts = [PROMPT.format(10 + i) for i in range(streams)]
        plain = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        constrained = SamplingParams(max_tokens=args.max_tokens, structured=spec)
        times: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        tokens: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, params in (("unconstrained", plain), ("constrained", constrained)):
                start = time.perf_counter()
                results = llm.generate(prompts, params)
                times[name].append(time.perf_counter() - start)
                tokens[name] = sum(len(r.outputs[0].token_ids) for r in results)
        rates = {name: tokens[name] / min(times[name]) for name in times}
        emit(
            {
                **record_header("structured", "sluice", args),
                "streams": streams,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "output_tokens": tokens,
                "unconstrained_tok_s": rates["unconstrained"],
                "constrained_tok_s": rates["constrained"],
                "ratio": rates["constrained"] / rates["unconstrained"],
                "schema_compile_ms": compile_s * 1e3,
            },
            args.output_file,
        )
    return 0


def _compile_seconds(llm, spec: StructuredOutput) -> float:
    """One schema's compile on a fresh, cache-cold compiler (its tokenizer table built first)."""
    engine = llm.engine
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size)
    compiler.compile(StructuredOutput("json_object"))  # builds the tokenizer table, not timed
    start = time.perf_counter()
    compiler.compile(spec)
    return time.perf_counter() - start
