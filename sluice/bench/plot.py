"""A one-page picture of a serving run: latency distributions and a per-request timeline.

Drawn on a bare `Figure`, not through pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sluice.bench.metrics import RequestRecord, percentile
from sluice.bench.serve import MixedResult


def plot_serve(records: Sequence[RequestRecord], title: str, path: str | Path) -> None:
    done = [r for r in records if r.ok]
    figure = Figure(figsize=(13, 9), layout="constrained")
    figure.suptitle(f"{title}: {len(done)} completed, {len(records) - len(done)} failed")
    (ttft, itl), (e2e, timeline) = figure.subplots(2, 2)
    _histogram(ttft, [r.ttft * 1000 for r in done], "time to first token (ms)")
    _histogram(itl, [gap * 1000 for r in done for gap in r.itls], "inter-token latency (ms)")
    _histogram(e2e, [r.e2e * 1000 for r in done], "end-to-end latency (ms)")
    _timeline(timeline, done)
    figure.savefig(path, dpi=110)


def _histogram(axes: Axes, values_ms: list[float], label: str) -> None:
    axes.set_xlabel(label)
    axes.set_ylabel("count")
    if not values_ms:
        return
    axes.hist(values_ms, bins=50, color="tab:blue")
    for q, style in ((50, "--"), (99, ":")):
        value = percentile(values_ms, q)
        axes.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.1f} ms")
    axes.legend(loc="upper right")


def _timeline(axes: Axes, records: list[RequestRecord]) -> None:
    """Each request as a bar from when it was sent to when it ended, in order of sending: the
    first part waits for the first token (queueing and prefill), the second decodes."""
    ordered = sorted(records, key=lambda r: r.start)
    rows = range(len(ordered))
    first_tokens = [r.chunk_times[0] for r in ordered]
    axes.hlines(
        rows, [r.start for r in ordered], first_tokens, color="tab:orange", label="to 1st token"
    )
    axes.hlines(rows, first_tokens, [r.end for r in ordered], color="tab:blue", label="decode")
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("request (by send time)")
    axes.legend(loc="lower right")


def plot_itl_comparison(results: Mapping[str, Sequence[MixedResult]], path: str | Path) -> None:
    """Per arm, the inter-token latencies of all its rounds as a histogram (log scales, p99
    dotted); beside it, the first round's latencies over time, each long prompt's arrival a
    vertical line."""
    figure = Figure(figsize=(13, 5.5), layout="constrained")
    distribution, timeline = figure.subplots(1, 2)
    pooled = {
        name: [gap * 1000 for run in runs for r in run.records if r.ok for gap in r.itls]
        for name, runs in results.items()
    }
    everything = [gap for gaps in pooled.values() for gap in gaps]
    if not everything:
        return
    bins = np.geomspace(max(min(everything), 0.01), max(everything) * 1.01, 60)
    for (name, runs), color in zip(results.items(), ("tab:orange", "tab:blue", "tab:green")):
        gaps = pooled[name]
        p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
        label = f"{name}: p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        distribution.hist(gaps, bins=bins, histtype="step", color=color, label=label)
        distribution.axvline(p99, color=color, linestyle=":")
        first = runs[0]
        points = [
            (later, 1000 * (later - earlier))
            for r in first.records
            if r.ok
            for earlier, later in itertools.pairwise(r.chunk_times)
        ]
        if points:
            timeline.scatter(*zip(*points), s=4, color=color, alpha=0.5, label=name)
        for arrival in first.arrival_times:
            timeline.axvline(arrival, color=color, alpha=0.3, linewidth=0.8)
    distribution.set(xscale="log", yscale="log", xlabel="inter-token latency (ms)", ylabel="count")
    distribution.legend()
    timeline.set(yscale="log", xlabel="seconds since start (first round)", ylabel="ITL (ms)")
    timeline.legend()
    figure.suptitle("steady decodes, long prompts arriving: disaggregated vs co-located")
    figure.savefig(path, dpi=110)


def plot_sparsity(records: Sequence[dict], path: str | Path) -> None:
    """Decode speed-up against perplexity increase, one line per sparsity rule, each point
    labelled with its CETT target and mean sparsity."""
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    for rule in dict.fromkeys(r["rule"] for r in records):
        points = [r for r in records if r["rule"] in (rule, "dense")]
        points.sort(key=lambda r: r["cett"])
        axes.plot(
            [100 * r["perplexity_increase"] for r in points],
            [r["speedup"] for r in points],
            marker="o",
            label=rule,
        )
        for r in points[1:] if rule != "dense" else []:
            axes.annotate(
                f"CETT {r['cett']:g}, {100 * r['mean_sparsity']:.0f}% sparse",
                (100 * r["perplexity_increase"], r["speedup"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("perplexity increase over dense (%)")
    axes.set_ylabel("single-stream decode speed / dense (same run)")
    axes.set_title("activation-sparse decoding: speed against accuracy")
    axes.legend()
    figure.savefig(path, dpi=110)
