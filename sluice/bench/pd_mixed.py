"""`sluice bench pd-mixed`: prefill/decode disaggregation against co-located servers on the
load it is for, steady decodes with long prompts arriving among them.

Two arms on the same cores, each behind `vllm-router` (round robin), all started here:
- `pd`: a `--role prefill` server on the first core and a `--role decode` server on the
  second (`--vllm-pd-disaggregation`); KV moves over NIXL (UCX; `UCX_TLS=tcp` unless set);
- `colocated`: two `--role both` servers, one per core.
Every server runs `--threads 1` under `taskset`. Rounds alternate the arms (pd, colocated, pd,
...), each round on a fresh workload (seeded), the same for both arms. Per arm and round one JSON
line: output tok/s, TTFT and ITL p50/p99 (all requests; also the steady decodes' alone), and for
`pd` the pulls D made (bytes and seconds per pull, from its /metrics); then a summary line with
the ratios the goals are stated in, over all rounds, and a plot of the ITL distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sluice.bench.datasets import BenchRequest, MixedWorkload, load_tokenizer
from sluice.bench.metrics import LatencyStats, RequestRecord, summarize
from sluice.bench.processes import Process, Processes
from sluice.bench.report import Record, emit
from sluice.bench.serve import LoadConfig, MixedResult, run_mixed_load
from sluice.server.openai import served_model_name

ARMS = ("pd", "colocated")
STARTUP_TIMEOUT_S = 600.0
PULL_METRICS = ("pd_pulls_completed", "pd_pulls_failed", "pd_pulled_bytes", "pd_pull_seconds")


@dataclass
class Arm:
    name: str
    router: Process
    decode: Process | None  # pd: the decode server, whose /metrics count the pulls


def _start_arms(processes: Processes, args: argparse.Namespace) -> list[Arm]:
    env = {"OMP_NUM_THREADS": "1", "UCX_TLS": os.environ.get("UCX_TLS", "tcp")}
    first, second = args.cores
    common = ["--model", args.model, "--threads", "1", *args.server_args.split()]
    prefill = processes.serve("prefill", first, [*common, "--role", "prefill"], env)
    decode = processes.serve("decode", second, [*common, "--role", "decode"], env)
    both = [processes.serve(f"both{i}", core, common, env) for i, core in enumerate(args.cores)]
    print("starting 4 servers ...", file=sys.stderr)
    processes.wait_healthy([prefill, decode, *both], STARTUP_TIMEOUT_S)
    pd_args = ["--vllm-pd-disaggregation", "--prefill", prefill.url, "--decode", decode.url]
    pd_router = processes.router("router-pd", "vllm-router", [*pd_args, "--policy", "round_robin"])
    colocated_router = processes.router(
        "router-colocated",
        "vllm-router",
        ["--worker-urls", both[0].url, both[1].url, "--policy", "round_robin"],
    )
    processes.wait_healthy([pd_router, colocated_router], 60.0)
    return [Arm("pd", pd_router, decode), Arm("colocated", colocated_router, None)]


def _pull_totals(arm: Arm) -> dict[str, float]:
    if arm.decode is None:
        return {}
    text = httpx.get(f"{arm.decode.url}/metrics", timeout=10, trust_env=False).text
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return {name: samples[f"sluice:{name}"] for name in PULL_METRICS}


def _pull_record(before: dict[str, float], after: dict[str, float]) -> Record:
    if not before:
        return {}
    delta = {name: after[name] - before[name] for name in PULL_METRICS}
    completed = delta["pd_pulls_completed"]
    return {
        "pulls_completed": int(completed),
        "pulls_failed": int(delta["pd_pulls_failed"]),
        "pulled_bytes": int(delta["pd_pulled_bytes"]),
        "pull_bytes_per_request": delta["pd_pulled_bytes"] / completed if completed else None,
        "pull_ms_per_request": 1000 * delta["pd_pull_seconds"] / completed if completed else None,
    }


def _latency_record(prefix: str, records: list[RequestRecord]) -> Record:
    done = [r for r in records if r.ok]
    ttft = LatencyStats.of([r.ttft for r in done])
    itl = LatencyStats.of([gap for r in done for gap in r.itls])
    return {
        f"{prefix}ttft_p50_ms": ttft.median_ms,
        f"{prefix}ttft_p99_ms": ttft.p99_ms,
        f"{prefix}itl_p50_ms": itl.median_ms,
        f"{prefix}itl_p99_ms": itl.p99_ms,
    }


def _run_arm(
    arm: Arm,
    args: argparse.Namespace,
    workload: MixedWorkload,
    requests: tuple[list[BenchRequest], list[BenchRequest], list[BenchRequest]],
    seed: int,
) -> tuple[MixedResult, Record]:
    """`requests`: (decodes, long prompts, warmups)."""
    decodes, long_prompts, warmups = requests
    config = LoadConfig(
        base_url=arm.router.url,
        model=served_model_name(args.model),
        request_rate=1.0 / args.arrival_interval,
        ignore_eos=True,
        seed=seed,
    )
    before = _pull_totals(arm)
    result = asyncio.run(
        run_mixed_load(
            config, decodes, long_prompts, args.decode_concurrency, warmups, args.lead_seconds
        )
    )
    metrics = summarize(result.records, result.duration_s)
    record: Record = {
        "bench": "pd-mixed",
        "arm": arm.name,
        "seed": seed,
        **asdict(workload),
        "decode_concurrency": args.decode_concurrency,
        "arrival_interval_s": args.arrival_interval,
        "server_args": args.server_args,
        "decodes_run": len(result.decodes),
        "completed": metrics.completed,
        "failed": metrics.failed,
        "duration_s": result.duration_s,
        "output_tokens": metrics.output_tokens,
        "output_throughput": metrics.output_throughput,
        **_latency_record("", result.records),
        **_latency_record("decode_", result.decodes),
        **_latency_record("long_", result.arrivals),
        **_pull_record(before, _pull_totals(arm)),
    }
    return result, record


def _summary(results: dict[str, list[MixedResult]]) -> Record:
    """Over all rounds: throughput as total tokens over total time, latencies pooled."""
    arms = {}
    for name, runs in results.items():
        records = [r for run in runs for r in run.records]
        tokens = sum(r.output_tokens for r in records if r.ok)
        arms[name] = {
            "output_throughput": tokens / sum(run.duration_s for run in runs),
            **_latency_record("", records),
        }
    pd, colocated = arms["pd"], arms["colocated"]
    itl_ratio = _ratio(pd["itl_p99_ms"], colocated["itl_p99_ms"])
    throughput_ratio = _ratio(pd["output_throughput"], colocated["output_throughput"])
    return {
        "bench": "pd-mixed-summary",
        "rounds": len(results["pd"]),
        **{
            f"{name}_{key}": value for name, values in arms.items() for key, value in values.items()
        },
        "itl_p99_pd_over_colocated": itl_ratio,
        "throughput_pd_over_colocated": throughput_ratio,
        "goal_itl_p99_met": itl_ratio is not None and itl_ratio <= 0.5,
        "goal_throughput_met": throughput_ratio is not None and throughput_ratio >= 0.9,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(args: argparse.Namespace) -> int:
    if len(args.cores) != 2:
        raise SystemExit("--cores takes two taskset core lists, such as 0,1")
    tokenizer = load_tokenizer(args.model)
    workload = MixedWorkload(
        num_decodes=args.decode_concurrency * 200,
        decode_input_len=args.decode_input_len,
        decode_output_len=args.decode_output_len,
        num_long_prompts=args.long_prompts,
        long_input_min=args.long_input_len[0],
        long_input_max=args.long_input_len[1],
        long_output_len=args.long_output_len,
    )
    results: dict[str, list[MixedResult]] = {name: [] for name in ARMS}
    with Processes(Path(args.log_dir)) as processes:
        arms = _start_arms(processes, args)
        for round_index in range(args.rounds):
            seed = args.seed + round_index
            requests = workload.build(tokenizer, seed)
            for arm in arms:
                print(f"round {round_index + 1}/{args.rounds}: {arm.name}", file=sys.stderr)
                result, record = _run_arm(arm, args, workload, requests, seed)
                results[arm.name].append(result)
                emit({"round": round_index, **record}, args.output_file)
    emit(_summary(results), args.output_file)
    if args.plot:
        from sluice.bench.plot import plot_itl_comparison  # matplotlib: only for plots

        plot_itl_comparison(results, args.plot)
    return 0
