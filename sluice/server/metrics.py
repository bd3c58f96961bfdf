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

from sluice.engine.engine import Engine
from sluice.engine.output import RequestOutput
from sluice.engine.request import FinishReason
from sluice.sparse.decoding import SparseDecoding

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
        for name, documentation, read in gauges:
            Gauge(f"sluice:{name}", documentation, registry=self.registry).set_function(read)
        sparse = getattr(engine.executor, "sparse", None)
        if sparse is not None:
            self._sparse_gauges(sparse)

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
