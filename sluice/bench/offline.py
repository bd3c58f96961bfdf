"""`sluice bench offline`: throughput on a batch of random requests, all submitted at once.

Prompts are random non-special token ids and outputs ignore EOS, so every backend does exactly
the same work. Only generation is timed, not loading the model. `batch_size` is the most
sequences in flight: sluice's `max_num_seqs` (continuous batching), transformers' static batch.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from sluice.bench.datasets import BenchRequest, load_tokenizer, random_id_requests
from sluice.bench.inprocess import load_llm, record_header
from sluice.bench.report import Record, emit
from sluice.config import resolve_device, resolve_dtype
from sluice.sampling_params import SamplingParams


@dataclass(frozen=True)
class OfflineRun:
    wall_s: float
    output_tokens: int  # the tokens the requests asked for and got


def run_sluice(args: argparse.Namespace, requests: list[BenchRequest]) -> OfflineRun:
    llm = load_llm(args)
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    results = llm.generate([r.prompt_ids for r in requests], params, progress=True)
    wall_s = time.perf_counter() - start
    return OfflineRun(wall_s, sum(len(result.outputs[0].token_ids) for result in results))


def run_transformers(args: argparse.Namespace, requests: list[BenchRequest]) -> OfflineRun:
    # Imported here: transformers takes seconds to import and only this backend needs it.
    from sluice.bench.hf_baseline import load_hf_model, transformers_generate

    device = resolve_device(args.device)
    model = load_hf_model(args.model, device, resolve_dtype(args.dtype, device))
    wall_s = transformers_generate(model, requests, args.max_num_seqs)
    # A static batch decodes to its longest request; the surplus is not useful output.
    return OfflineRun(wall_s, sum(r.output_len for r in requests))


BACKENDS = {"sluice": run_sluice, "transformers": run_transformers}


def offline_record(
    args: argparse.Namespace, requests: list[BenchRequest], run: OfflineRun
) -> Record:
    input_tokens = sum(r.prompt_len for r in requests)
    return {
        **record_header("offline", args.backend, args),
        "num_requests": len(requests),
        "batch_size": args.max_num_seqs,
        "input_tokens": input_tokens,
        "output_tokens": run.output_tokens,
        "wall_s": run.wall_s,
        "output_tok_s": run.output_tokens / run.wall_s,
        "total_tok_s": (input_tokens + run.output_tokens) / run.wall_s,
        "requests_s": len(requests) / run.wall_s,
    }


def main(args: argparse.Namespace) -> int:
    requests = random_id_requests(
        load_tokenizer(args.model),
        args.num_prompts,
        (args.input_len_min, args.input_len_max),
        (args.output_len_min, args.output_len_max),
        args.seed,
    )
    run = BACKENDS[args.backend](args, requests)
    emit(offline_record(args, requests, run), args.output_file)
    return 0
