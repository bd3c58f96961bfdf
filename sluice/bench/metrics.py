"""Serving metrics from per-request timings: TTFT, TPOT, ITL and end-to-end latency, and throughput.

Definitions follow vLLM's and SGLang's bench_serving, so numbers compare across tools:

- TTFT: request sent -> first chunk carrying text.
- ITL: the gap between consecutive text chunks, pooled over all requests (a server that sends
  several tokens in one chunk shows one longer gap, not several short ones).
- TPOT: (E2E - TTFT) / (output tokens - 1) per request, for requests of two or more tokens.
- E2E: request sent -> end of the stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """One request's timings, in seconds since the benchmark started."""

    prompt_len: int
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carried text
    end: float = 0.0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache, per `usage`
    error: str | None = None  # the client also sets one when no text arrived: no TTFT then

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default, as vLLM reports)."""
    return float(np.percentile(values, q))


@dataclass(frozen=True)
class LatencyStats:
    """Mean, median and p99 in milliseconds; None when there were no samples."""

    mean_ms: float | None
    median_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if not seconds:
            return cls(None, None, None)
        ms = [s * 1000 for s in seconds]
        return cls(float(np.mean(ms)), percentile(ms, 50), percentile(ms, 99))


@dataclass(frozen=True)
class ServeMetrics:
    completed: int
    failed: int
    duration_s: float
    input_tokens: int  # of completed requests
    output_tokens: int  # of completed requests
    cached_input_tokens: int  # of input_tokens, those the server's prefix cache supplied
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s

    @property
    def input_throughput(self) -> float:
        return self.input_tokens / self.duration_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s

    def as_record(self) -> dict[str, float | int | None]:
        """Flat, vLLM-style keys (`mean_ttft_ms`, ...), for one JSON line."""
        record: dict[str, float | int | None] = {
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "prefill_tokens_computed": self.input_tokens - self.cached_input_tokens,
            "request_throughput": self.request_throughput,
            "input_throughput": self.input_throughput,
            "output_throughput": self.output_throughput,
        }
        for name in ("ttft", "tpot", "itl", "e2e"):
            stats: LatencyStats = getattr(self, name)
            record[f"mean_{name}_ms"] = stats.mean_ms
            record[f"median_{name}_ms"] = stats.median_ms
            record[f"p99_{name}_ms"] = stats.p99_ms
        return record


def summarize(records: Sequence[RequestRecord], duration_s: float) -> ServeMetrics:
    done = [r for r in records if r.ok]
    return ServeMetrics(
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        input_tokens=sum(r.prompt_len for r in done),
        output_tokens=sum(r.output_tokens for r in done),
        cached_input_tokens=sum(r.cached_tokens for r in done),
        ttft=LatencyStats.of([r.ttft for r in done]),
        tpot=LatencyStats.of([t for r in done if (t := r.tpot) is not None]),
        itl=LatencyStats.of([gap for r in done for gap in r.itls]),
        e2e=LatencyStats.of([r.e2e for r in done]),
    )
