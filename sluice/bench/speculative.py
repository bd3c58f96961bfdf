"""`sluice bench speculative`: output tokens per second with and without speculative decoding
on the fixed prompt set of `spec_workloads`, and how many drafts were accepted.

One engine, set up for speculation, runs each workload both ways, in rounds of one run each
way (off then on, then on then off, ...) so that a noisy machine slows both alike; "off" is the
same engine with the requests' `speculative=False`. `speedup` is of the totals; each round's own
ratio is given too, with their median, which a burst of load on a shared machine moves least.
Each prompt is run once before timing, so both ways find it in the prefix cache and the timings
are of decoding; a workload's JSON line comes when it is done. Greedy, so both ways produce the
same tokens.

Before each speculative run the proposer forgets what finished requests taught it (suffix
decoding's global tree): otherwise the warm-up's and the earlier runs' answers to the very same
prompt would be replayed, the case of an agent repeating a request (`--keep-outputs`), not of
a prompt seen for the first time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

from sluice.api import LLM
from sluice.bench.inprocess import load_llm, record_header
from sluice.bench.report import emit, format_table
from sluice.bench.spec_workloads import WORKLOADS
from sluice.sampling_params import SamplingParams
from sluice.spec.stats import SpecStats


@dataclass
class _Timing:
    tokens: int = 0
    seconds: float = 0.0
    # The process's CPU time: on a shared machine, with one thread, the work done whatever the
    # other processes take (with more threads it counts their spinning too).
    cpu_seconds: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tok_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds else 0.0

    def add(self, other: _Timing) -> None:
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds


@dataclass
class _Workload:
    prompt: list[int]
    off: _Timing = field(default_factory=_Timing)
    on: _Timing = field(default_factory=_Timing)
    stats: SpecStats = field(default_factory=SpecStats)
    round_speedups: list[float] = field(default_factory=list)


def _run(llm: LLM, prompt: list[int], args: argparse.Namespace, speculative: bool) -> _Timing:
    params = SamplingParams(max_tokens=args.output_len, speculative=speculative)
    start, cpu_start = time.perf_counter(), time.process_time()
    results = llm.generate([prompt] * args.concurrency, params)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return _Timing(sum(len(r.outputs[0].token_ids) for r in results), seconds, cpu_seconds)


def _measure(
    llm: LLM, workload: _Workload, args: argparse.Namespace, speculative_first: bool
) -> None:
    """One round: a run each way."""
    timings = {}
    for speculative in (speculative_first, not speculative_first):
        if speculative and not args.keep_outputs:
            llm.engine.proposer.forget_outputs()
        before = llm.engine.scheduler.spec_stats.snapshot()
        timings[speculative] = _run(llm, workload.prompt, args, speculative)
        drafted = llm.engine.scheduler.spec_stats.since(before)
        workload.stats.record_all(drafted)
    workload.off.add(timings[False])
    workload.on.add(timings[True])
    workload.round_speedups.append(timings[True].tok_s / timings[False].tok_s)


def _draft_settings(args: argparse.Namespace) -> dict[str, str]:
    if args.speculative_method != "draft":
        return {}
    return {"draft_model": args.draft_model, "draft_quantization": args.draft_quantization}


def main(args: argparse.Namespace) -> int:
    args.speculative_method = args.speculative_method or "ngram"
    llm = load_llm(args)
    workloads = {
        name: _Workload(llm.chat_prompt([{"role": "user", "content": WORKLOADS[name]}]))
        for name in args.workloads
    }
    for name, workload in workloads.items():
        _run(llm, workload.prompt, args, speculative=True)  # warm up; cache the prompt
        for index in range(args.rounds):
            _measure(llm, workload, args, speculative_first=index % 2 == 1)
        record = {
            **record_header("speculative", "sluice", args),
            "workload": name,
            "method": args.speculative_method,
            **_draft_settings(args),
            "num_speculative_tokens": llm.engine.config.speculative.num_speculative_tokens,
            "concurrency": args.concurrency,
            "output_len": args.output_len,
            "rounds": args.rounds,
            "keep_outputs": args.keep_outputs,
            "output_tok_s_off": round(workload.off.tok_s, 2),
            "output_tok_s_on": round(workload.on.tok_s, 2),
            "speedup": round(workload.on.tok_s / workload.off.tok_s, 3),
            "speedup_median": round(statistics.median(workload.round_speedups), 3),
            "speedup_rounds": [round(ratio, 3) for ratio in workload.round_speedups],
            "output_tok_per_cpu_s_off": round(workload.off.tok_per_cpu_s, 2),
            "output_tok_per_cpu_s_on": round(workload.on.tok_per_cpu_s, 2),
            "cpu_speedup": round(workload.on.tok_per_cpu_s / workload.off.tok_per_cpu_s, 3),
            **workload.stats.as_record(),
        }
        print(format_table(f"speculative: {name}", list(record.items())), flush=True)
        emit(record, args.output_file)
    return 0
