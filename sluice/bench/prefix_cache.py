"""`sluice bench prefix-cache`: the KV bookkeeping one decode step costs, by context length.

No model: the real `KVCacheManager`, `PrefixCache` and `PagePool` driven as the scheduler drives
them for one request. A prompt of `context` random tokens is prefilled in chunks of the
scheduler's token budget, caching each chunk; then every decode step checks that a page fits,
allocates for one token, counts it computed and offers full pages to the prefix cache. Only
those calls are timed, step by step; a page fills every `page_size` steps, and those steps are
also summarized alone (they carry the prefix-cache insert). The CPU time of the whole loop gives
a mean that other processes on the machine do not inflate. One JSON line per context.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from sluice.bench.report import Record, emit
from sluice.engine.cache_manager import KVCacheManager, PagePool
from sluice.engine.prefix_cache import PrefixCache
from sluice.engine.request import Request
from sluice.sampling_params import SamplingParams

VOCAB = 32000


@dataclass(frozen=True)
class DecodeRun:
    step_ns: list[int]  # wall time of each step's bookkeeping
    # This thread's CPU time over the whole loop (the timer calls included): on a shared machine
    # it leaves out the time other processes took, which the wall times cannot.
    cpu_ns: int


def decode_run(context: int, steps: int, page_size: int, chunk: int, seed: int) -> DecodeRun:
    """The bookkeeping of `steps` decode steps after a `context` prefill."""
    rng = random.Random(seed)
    pool = PagePool((context + steps) // page_size + 2)
    kv = KVCacheManager(pool, page_size, PrefixCache(pool, page_size))
    request = Request(
        "bench",
        [rng.randrange(VOCAB) for _ in range(context)],
        SamplingParams(max_tokens=steps + 1, ignore_eos=True),
        max_total_tokens=context + steps + 1,
    )
    kv.match_prefix(request)
    while request.num_computed_tokens < context:
        num_tokens = min(chunk, context - request.num_computed_tokens)
        kv.allocate(request, num_tokens)
        request.num_computed_tokens += num_tokens
        kv.cache_computed(request)
    samples = [rng.randrange(VOCAB) for _ in range(steps)]
    timings = []
    cpu_start = time.thread_time_ns()
    for sample in samples:
        request.output_token_ids.append(sample)  # the previous step's
        start = time.perf_counter_ns()
        if not kv.can_allocate(request, 1):  # the scheduler asks before every allocation
            raise RuntimeError("the pool is sized to hold the whole run")
        kv.allocate(request, 1)
        request.num_computed_tokens += 1
        kv.cache_computed(request)
        timings.append(time.perf_counter_ns() - start)
    cpu_ns = time.thread_time_ns() - cpu_start
    kv.free(request)
    return DecodeRun(timings, cpu_ns)


def summary(prefix: str, timings_ns: list[int]) -> Record:
    micros = sorted(t / 1000 for t in timings_ns)
    return {
        f"{prefix}_mean_us": statistics.fmean(micros),
        f"{prefix}_p50_us": micros[len(micros) // 2],
        f"{prefix}_p99_us": micros[min(len(micros) - 1, len(micros) * 99 // 100)],
    }


def main(args: argparse.Namespace) -> int:
    for context in args.contexts:
        timings: list[int] = []
        filled: list[int] = []
        cpu_ns = 0
        for repeat in range(args.repeats):
            run = decode_run(
                context, args.steps, args.page_size, args.max_num_batched_tokens, args.seed + repeat
            )
            timings += run.step_ns
            cpu_ns += run.cpu_ns
            # Step i (from 0) completes token context + i + 1: a page fills when that is aligned.
            filled += [
                t for i, t in enumerate(run.step_ns) if (context + i + 1) % args.page_size == 0
            ]
        record: Record = {
            "bench": "prefix-cache",
            "context": context,
            "decode_steps": args.steps,
            "repeats": args.repeats,
            "page_size": args.page_size,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "step_cpu_mean_us": cpu_ns / 1000 / len(timings),
            **summary("step", timings),
            **summary("filled_page_step", filled),
        }
        emit(record, args.output_file)
    return 0
