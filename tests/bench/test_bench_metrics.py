"""Serving metrics on hand-made timings: every expected value worked out by hand."""

from __future__ import annotations

import pytest

from sluice.bench.metrics import LatencyStats, RequestRecord, percentile, summarize

EXACT = 1e-12


def test_percentile_interpolates_linearly_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97, rel=EXACT)
    assert percentile(list(range(1, 102)), 99) == 100
    assert percentile([7.0], 99) == 7.0


def test_request_timings() -> None:
    record = RequestRecord(prompt_len=10, start=0.0, chunk_times=[0.25, 0.5, 1.0], end=1.0)
    record.output_tokens = 3
    assert record.ttft == 0.25
    assert record.itls == [0.25, 0.5]
    assert record.e2e == 1.0
    assert record.tpot == (1.0 - 0.25) / 2 == 0.375


def test_tpot_counts_tokens_not_chunks() -> None:
    # Two chunks of two tokens each: 3 tokens after the first, over 0.75 s.
    record = RequestRecord(prompt_len=1, start=0.0, chunk_times=[0.25, 1.0], end=1.0)
    record.output_tokens = 4
    assert record.tpot == 0.25
    assert record.itls == [0.75]


def test_single_token_request_has_no_tpot() -> None:
    record = RequestRecord(prompt_len=1, start=2.0, chunk_times=[2.5], end=2.5, output_tokens=1)
    assert record.tpot is None
    assert record.itls == []


def test_latency_stats_of_nothing_is_none() -> None:
    assert LatencyStats.of([]) == LatencyStats(None, None, None)


def test_summarize() -> None:
    records = [
        RequestRecord(10, start=0.0, chunk_times=[0.25, 0.5, 1.0], end=1.0, output_tokens=3),
        RequestRecord(20, 1.0, [1.5, 2.0], end=2.5, output_tokens=2, cached_tokens=16),
        RequestRecord(99, start=1.0, end=1.5, cached_tokens=64, error="HTTP 500: boom"),
    ]
    metrics = summarize(records, duration_s=4.0)
    assert (metrics.completed, metrics.failed) == (2, 1)
    assert (metrics.input_tokens, metrics.output_tokens) == (30, 5)  # failures count nothing
    assert metrics.cached_input_tokens == 16
    assert metrics.as_record()["prefill_tokens_computed"] == 14
    assert metrics.request_throughput == 0.5
    assert metrics.input_throughput == 7.5
    assert metrics.output_throughput == 1.25
    # TTFT 250 and 500 ms; p99 = 250 + 0.99 * 250.
    assert metrics.ttft.mean_ms == 375.0
    assert metrics.ttft.median_ms == 375.0
    assert metrics.ttft.p99_ms == pytest.approx(497.5, rel=EXACT)
    # TPOT (1.0 - 0.25) / 2 = 375 ms and (1.5 - 0.5) / 1 = 1000 ms.
    assert metrics.tpot.mean_ms == 687.5
    assert metrics.tpot.p99_ms == pytest.approx(375 + 0.99 * 625, rel=EXACT)
    # ITL pooled over requests: 250, 500 and 500 ms.
    assert metrics.itl.mean_ms == pytest.approx(1250 / 3, rel=EXACT)
    assert metrics.itl.median_ms == 500.0
    assert metrics.itl.p99_ms == 500.0
    # E2E 1000 and 1500 ms.
    assert metrics.e2e.mean_ms == 1250.0
    assert metrics.e2e.p99_ms == pytest.approx(1495.0, rel=EXACT)


def test_record_keys_are_flat() -> None:
    record = RequestRecord(1, start=0.0, chunk_times=[0.5, 1.0], end=1.0, output_tokens=2)
    flat = summarize([record], duration_s=2.0).as_record()
    assert flat["completed"] == 1
    assert flat["mean_ttft_ms"] == 500.0
    assert flat["median_itl_ms"] == 500.0
    assert flat["p99_tpot_ms"] == 500.0
    assert flat["mean_e2e_ms"] == 1000.0
    assert flat["output_throughput"] == 1.0
