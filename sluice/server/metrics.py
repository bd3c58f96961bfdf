"""Prometheus metrics for /metrics, named like vLLM's with a `sluice:` prefix.

Each app has a registry of its own, so several servers (or tests) in one process do not share
counts. Engine state (running, waiting, KV pages) is read when scraped; everything else is
counted from the outputs each request receives, by a `RequestTracker`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sluice.disagg.decode import PULL_FAILURES
from sluice.disagg.role import Disaggregation
from sluice.engine.engine import Engine
from sluice.engine.output import RequestOutput
from sluice.engine.request import FinishReason
from sluice.sparse.decoding import SparseDecoding
from sluice.spec.stats import SpecStats

# Seconds; wide enough for a laptop CPU at the top and a GPU at the bottom.
_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_TOKEN_GAP_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self._engine_gauges(engine)
        if engine.proposer is not None:
            self.registry.register(SpecDecodeCollector(engine.scheduler.spec_stats))
        self.prompt_tokens = self._counter(
            "prompt_tokens", "Prompt tokens of requests that started."
        )
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.")
        self.finished = self._counter(
            "request_success", "Sequences (one per sample) that ended, by why.", ["finished_reason"]
        )
        for reason in FinishReason:
            self.finished.labels(reason.value)  # export every reason from the start, at 0
        self.prefix_cache_queries = self._counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache, one lookup per sample.",
        )
        self.prefix_cache_hits = self._counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.time_to_first_token = self._histogram(
            "time_to_first_token_seconds", "From arrival to the first token.", _LATENCY_BUCKETS
        )
        self.inter_token_latency = self._histogram(
            "inter_token_latency_seconds",
            "Between consecutive tokens of a sample.",
            _TOKEN_GAP_BUCKETS,
        )
        self.e2e_latency = self._histogram(
            "e2e_request_latency_seconds",
            "From arrival to the last token of a request.",
            _LATENCY_BUCKETS,
        )
        self.queue_time = self._histogram(
            "request_queue_time_seconds",
            "From entering the engine to first being scheduled.",
            _LATENCY_BUCKETS,
        )

    def track(self, arrival: float, num_samples: int) -> RequestTracker:
        """`arrival`: time.monotonic() when the HTTP request came in."""
        return RequestTracker(self, arrival, num_samples)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _engine_gauges(self, engine: Engine) -> None:
        # Read from the engine thread's state at scrape time: len() of a list is atomic.
        gauges: list[tuple[str, str, Callable[[], float]]] = [
            ("num_requests_running", "Sequences in the running batch.", lambda: engine.num_running),
            (
                "num_requests_waiting",
                "Sequences waiting to be scheduled.",
                lambda: engine.num_waiting,
            ),
            (
                "kv_cache_pages_used",
                "KV cache pages in use, the prefix cache's included.",
                lambda: engine.pool.num_used,
            ),
            ("kv_cache_pages_total", "KV cache pages in the pool.", lambda: engine.pool.num_pages),
            (
                "kv_cache_pages_cached",
                "KV cache pages the prefix cache keeps.",
                lambda: _cached_pages(engine),
            ),
        ]
        if engine.state_pool is not None:
            gauges += _state_gauges(engine)
        if engine.disagg is not None:
            gauges += _disagg_gauges(engine.disagg)
        for name, documentation, read in gauges:
            Gauge(f"sluice:{name}", documentation, registry=self.registry).set_function(read)
        for name, documentation, read in _vllm_gauges(engine):
            Gauge(f"vllm:{name}", documentation, registry=self.registry).set_function(read)
        if engine.disagg is not None:
            self._pull_failures(engine.disagg)
        sparse = getattr(engine.executor, "sparse", None)
        if sparse is not None:
            self._sparse_gauges(sparse)

    def _pull_failures(self, disagg: Disaggregation) -> None:
        failures = disagg.pulls.stats.failures
        gauge = Gauge(
            "sluice:pd_pulls_failed_by_cause",
            "Pulls that failed (recomputed, or the request failed), by why.",
            ["cause"],
            registry=self.registry,
        )
        for cause in PULL_FAILURES:
            gauge.labels(cause).set_function(lambda cause=cause: failures.get(cause, 0))

    def _sparse_gauges(self, sparse: SparseDecoding) -> None:
        """Per MLP layer: the share of neurons sparse decodes skipped so far (read at scrape
        time), and the predictor's recall on held-out calibration tokens."""
        skipped = Gauge(
            "sluice:sparse_mlp_sparsity",
            "Share of MLP neurons skipped by sparse decodes so far, per layer.",
            ["layer"],
            registry=self.registry,
        )
        recall = Gauge(
            "sluice:sparse_predictor_recall",
            "Recall of the layer's active-neuron predictor on held-out calibration tokens.",
            ["layer"],
            registry=self.registry,
        )
        for i in range(len(sparse.layers)):
            skipped.labels(layer=str(i)).set_function(
                lambda i=i: sparse.layer_stats()[i]["sparsity"]
            )
            quality = sparse.profile.layers[i].predictor
            if sparse.rule == "predictor" and quality is not None:
                recall.labels(layer=str(i)).set(quality.recall)

    def _counter(self, name: str, documentation: str, labels: list[str] | None = None) -> Counter:
        return Counter(f"sluice:{name}", documentation, labels or [], registry=self.registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"sluice:{name}", documentation, buckets=buckets, registry=self.registry)


class SpecDecodeCollector(Collector):
    """Speculative decoding's acceptance, read from the scheduler's running totals when scraped
    (named as vLLM's `spec_decode_*`)."""

    def __init__(self, stats: SpecStats) -> None:
        self._stats = stats

    def collect(self):
        stats = self._stats.snapshot()  # the engine thread may be adding to it
        yield _counter(
            "num_drafts", "Verify steps: a request's step that carried drafts.", stats.num_drafts
        )
        yield _counter("num_draft_tokens", "Draft tokens verified.", stats.num_draft_tokens)
        yield _counter(
            "num_accepted_tokens",
            "Draft tokens the target model accepted.",
            stats.num_accepted_tokens,
        )
        per_position = CounterMetricFamily(
            "sluice:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each position of the drafts (0: the first).",
            labels=["position"],
        )
        for position, count in enumerate(stats.accepted_per_position):
            per_position.add_metric([str(position)], count)
        yield per_position
        yield GaugeMetricFamily(
            "sluice:spec_decode_acceptance_rate",
            "Accepted draft tokens over verified ones, since the start.",
            value=stats.acceptance_rate,
        )
        yield GaugeMetricFamily(
            "sluice:spec_decode_mean_acceptance_length",
            "Tokens a verify step yields on average (accepted drafts + 1), since the start.",
            value=stats.mean_acceptance_length,
        )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"sluice:spec_decode_{name}", documentation, value=value)


def _state_gauges(engine: Engine) -> list[tuple[str, str, Callable[[], float]]]:
    """Hybrid models: the recurrent-state slot pool beside the KV pages."""
    pool = engine.state_pool
    return [
        (
            "state_slots_used",
            "Recurrent-state slots in use: running requests' and prefix-cache checkpoints.",
            lambda: pool.num_slots - pool.num_free,
        ),
        ("state_slots_total", "Recurrent-state slots in the pool.", lambda: pool.num_slots),
        (
            "state_checkpoints",
            "Recurrent-state checkpoints the prefix cache keeps.",
            lambda: engine.prefix_cache.num_checkpoints if engine.prefix_cache else 0,
        ),
    ]


def _vllm_gauges(engine: Engine) -> list[tuple[str, str, Callable[[], float]]]:
    """The names routers and llm-d's endpoint picker scrape from vLLM."""
    pool = engine.pool
    return [
        ("num_requests_running", "Sequences in the running batch.", lambda: engine.num_running),
        ("num_requests_waiting", "Sequences waiting to be scheduled.", lambda: engine.num_waiting),
        (
            "kv_cache_usage_perc",
            "Share of KV cache pages in use (1 = all), the prefix cache's included.",
            lambda: pool.num_used / pool.num_pages,
        ),
    ]


def _disagg_gauges(disagg: Disaggregation) -> list[tuple[str, str, Callable[[], float]]]:
    """Prefill/decode disaggregation: P's leases, D's pulls (totals since start)."""
    leases, stats = disagg.leases, disagg.pulls.stats
    return [
        (
            "pd_leases",
            "Prefills whose pages wait for a decode instance.",
            lambda: leases.num_leases,
        ),
        ("pd_leased_pages", "KV pages held under leases.", lambda: leases.num_pages),
        ("pd_leases_released", "Leases a decode instance released.", lambda: disagg.num_released),
        ("pd_leases_expired", "Leases that expired unclaimed.", lambda: leases.num_expired),
        ("pd_pulls_in_flight", "Pulls under way.", lambda: disagg.pulls.num_in_flight),
        ("pd_pulls_completed", "Pulls that completed.", lambda: stats.completed),
        (
            "pd_pulls_failed",
            "Pulls that failed (recomputed, or the request failed: --pd-on-transfer-failure).",
            lambda: stats.failed,
        ),
        (
            "pd_awaiting_params",
            "Requests admitted (pages allocated) before their prefill instance's params came.",
            lambda: disagg.pulls.num_awaiting_params,
        ),
        ("pd_pulled_pages", "KV pages pulled.", lambda: stats.pages),
        ("pd_pulled_bytes", "KV bytes pulled.", lambda: stats.bytes),
        ("pd_pull_seconds", "Time spent in completed pulls.", lambda: stats.seconds),
        (
            "pd_cached_pages",
            "Prompt pages the decode instance's own prefix cache had (not pulled).",
            lambda: stats.cached_pages,
        ),
    ]


def _cached_pages(engine: Engine) -> int:
    # Idle pages stay in use while the prefix cache keeps them; it gives them up on demand.
    return engine.prefix_cache.num_cached_pages if engine.prefix_cache is not None else 0


class RequestTracker:
    """Times one engine request: a prompt and its `n` samples."""

    def __init__(self, metrics: ServerMetrics, arrival: float, num_samples: int) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._num_samples = num_samples
        self._last_token_time: dict[int, float] = {}  # per sample
        self._num_finished = 0

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if not self._last_token_time:
            self._first_output(out, now)
        previous = self._last_token_time.get(out.index)
        if previous is None:
            self._first_output_of_sample(out)
        else:
            self._metrics.inter_token_latency.observe(now - previous)
        self._last_token_time[out.index] = now
        self._metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished:
            self._num_finished += 1
            self._metrics.finished.labels(out.finish_reason.value).inc()
            if self._num_finished == self._num_samples:
                self._metrics.e2e_latency.observe(now - self._arrival)

    def close(self, aborted: bool = True) -> None:
        """The request ended: samples that did not finish were aborted (e.g. the client left),
        unless the engine refused the request before running any of them (`aborted=False`)."""
        num_aborted = self._num_samples - self._num_finished
        if aborted and num_aborted:
            self._metrics.finished.labels(FinishReason.ABORT.value).inc(num_aborted)

    def _first_output(self, out: RequestOutput, now: float) -> None:
        self._metrics.time_to_first_token.observe(now - self._arrival)
        self._metrics.prompt_tokens.inc(out.num_prompt_tokens)

    def _first_output_of_sample(self, out: RequestOutput) -> None:
        # Each sample is its own sequence in the engine, scheduled and looked up on its own.
        if out.queue_time is not None:
            self._metrics.queue_time.observe(out.queue_time)
        self._metrics.prefix_cache_queries.inc(out.num_prompt_tokens)
        self._metrics.prefix_cache_hits.inc(out.num_cached_tokens)
