"""`sluice bench verify-step`: what a speculative verify step costs against a one-row decode.

One request at a fixed context computes 1 + k tokens (its last token and k drafts) through the
compiled step, for each row count asked; every count runs through the decode graph (a row per
token, the path verify steps take) and, for comparison, through the other graph (attention as
an opaque operator, Python between layers: the path they took before). The variants alternate
within each round, so a noisy machine slows them alike; medians over the rounds are reported as
milliseconds and as multiples of the one-row decode. The ratio per draft row is what
`--speculative-draft-row-cost` takes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sluice.api import LLM
from sluice.attention.metadata import AttentionMetadata
from sluice.bench.inprocess import load_llm, record_header
from sluice.bench.report import emit, format_table
from sluice.engine.model_runner import ModelRunner
from sluice.layers.forward_context import ForwardContext

# Calls per timing: a round's time per variant is their mean.
_CALLS = 5


def _step(runner: ModelRunner, rows: int, context: int, mixed_graph: bool) -> None:
    """One compiled step of one request's `rows` tokens after `context` cached ones."""
    pages = [list(range(1, 2 + (context + rows) // runner.page_size))]
    ids = torch.randint(0, runner.model.config.vocab_size, (rows,))
    if mixed_graph:
        meta = AttentionMetadata.build(
            [rows], [context], pages, runner.page_size, runner.device, paged_kernel=True
        )
        ctx = ForwardContext(meta, runner.kv_cache, runner.backend)
    else:
        ctx = runner.forward_context([rows], [context], pages)
    runner.compiled_step(ids, ctx, torch.arange(rows))


def _time(runner: ModelRunner, rows: int, context: int, mixed_graph: bool) -> float:
    start = time.perf_counter()
    for _ in range(_CALLS):
        _step(runner, rows, context, mixed_graph)
    return (time.perf_counter() - start) / _CALLS


def main(args: argparse.Namespace) -> int:
    llm: LLM = load_llm(args)
    runner = llm.engine.executor
    if not isinstance(runner, ModelRunner) or runner.compiled_step is None:
        raise SystemExit("verify-step measures the compiled step: run without --no-compile")
    variants = [(1, False)] + [(n, graph) for n in args.rows if n > 1 for graph in (False, True)]
    times: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for variant in variants:  # warm up: compile nothing later, fill the caches
            _time(runner, variant[0], args.context, variant[1])
        for _ in range(args.rounds):
            for variant in variants:
                times[variant].append(_time(runner, variant[0], args.context, variant[1]))
    decode = statistics.median(times[(1, False)])
    for (rows, mixed_graph), measured in times.items():
        seconds = statistics.median(measured)
        record = {
            **record_header("verify-step", "sluice", args),
            "threads": args.threads,
            "context": args.context,
            "rows": rows,
            "graph": "mixed" if mixed_graph else "decode",
            "step_ms": round(seconds * 1e3, 3),
            "decode_steps": round(seconds / decode, 3),
            "per_draft_row": round((seconds / decode - 1) / (rows - 1), 3) if rows > 1 else None,
        }
        print(format_table(f"verify step: {rows} rows", list(record.items())), flush=True)
        emit(record, args.output_file)
    return 0
