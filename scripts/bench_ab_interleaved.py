"""A change against the commit before it, measured in alternation: two engines, one per checkout,
each in a process of its own and loaded once, take turns on the same requests (ABBA order), and
what is reported is the median over pairs of head / base.

Rounds of whole benchmarks, one checkout after the other (scripts/bench_ab.sh), see the
machine's drift of 10-20% over minutes as a difference between the two; a pair here is seconds
apart, so drift cancels out of its ratio.

    BASE=../base .venv/bin/python scripts/bench_ab_interleaved.py --pairs 10 --threads 2

Each checkout's `sluice` is imported from that checkout; both use the interpreter running this
script. JSON lines: one per measurement, then one summary per metric.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

# Runs inside each checkout (cwd): reads one JSON command per line, answers one JSON line.
_WORKER = r"""
import json, sys, time
from sluice.api import LLM
from sluice.bench.latency import token_times
from sluice.sampling_params import SamplingParams

llm = LLM(threads=int(sys.argv[1]), max_num_seqs=32, enable_prefix_cache=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if job["kind"] == "stream":
        times = token_times(llm, job["prompts"][0], job["output_len"])
        answer = {"ttft_s": times[0], "decode_s": times[-1] - times[0], "tokens": len(times)}
    else:  # "batch": every prompt at once (32 run together)
        params = SamplingParams(max_tokens=job["output_len"], ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(job["prompts"], params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        answer = {"seconds": seconds, "tokens": tokens}
    print(json.dumps(answer), flush=True)
"""

# metric -> (job kind, prompts, input tokens, output tokens)
_JOBS = {
    "decode_after_8": ("stream", 1, 8, 128),
    "prefill_512": ("stream", 1, 512, 1),
    "decode_after_512": ("stream", 1, 512, 128),
    "concurrent_32": ("batch", 32, 128, 64),
}


class Engine:
    """One checkout's engine in a process of its own."""

    def __init__(self, label: str, tree: Path, threads: int) -> None:
        self.label = label
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(threads)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._answer()  # loaded and compiled

    def run(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} engine exited ({self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def speed(metric: str, answer: dict) -> float:
    """Tokens a second: prefill for prefill_*, decode after the first token, or output tokens."""
    kind, _, input_len, _ = _JOBS[metric]
    if kind == "batch":
        return answer["tokens"] / answer["seconds"]
    if metric.startswith("prefill"):
        return input_len / answer["ttft_s"]
    return (answer["tokens"] - 1) / answer["decode_s"]


def make_job(metric: str, rng: random.Random) -> dict:
    """Fresh random prompts (no prefix is ever shared), the same for both engines."""
    kind, count, input_len, output_len = _JOBS[metric]
    prompts = [[rng.randrange(1000, 40000) for _ in range(input_len)] for _ in range(count)]
    return {"kind": kind, "prompts": prompts, "output_len": output_len}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=os.environ.get("BASE"))
    parser.add_argument("--head", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--metrics", default=",".join(_JOBS))
    args = parser.parse_args()
    if args.base is None:
        parser.error("give the earlier checkout with --base or BASE=")
    metrics = args.metrics.split(",")
    engines = [Engine("base", args.base.resolve(), args.threads)]
    engines.append(Engine("head", args.head.resolve(), args.threads))
    rng = random.Random(0)
    for engine in engines:  # warm-up: a prefill and a decode at each size
        for metric in metrics:
            engine.run(make_job(metric, rng) | {"output_len": 2})
    ratios: dict[str, list[float]] = {m: [] for m in metrics}
    for pair in range(args.pairs):
        order = engines if pair % 2 == 0 else engines[::-1]
        for metric in metrics:
            job = make_job(metric, rng)
            speeds = {e.label: speed(metric, e.run(job)) for e in order}
            ratios[metric].append(speeds["head"] / speeds["base"])
            print(json.dumps({"pair": pair, "metric": metric, **speeds}), flush=True)
    for engine in engines:
        engine.close()
    for metric, values in ratios.items():
        summary = {
            "metric": metric,
            "pairs": len(values),
            "median_head_over_base": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
