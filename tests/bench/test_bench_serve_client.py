"""The load generator against a stand-in OpenAI server on 127.0.0.1 that streams real SSE."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sluice.bench.datasets import BenchRequest
from sluice.bench.serve import LoadConfig, LoadResult, arrival_gaps, run_load, run_mixed_load
from sluice.cli import main as sluice_main


@dataclass
class FakeServerSettings:
    tokens_per_chunk: int = 1
    send_usage: bool = True
    cached_tokens: int = 0
    fail_max_tokens: set[int] = field(default_factory=set)  # answer HTTP 500 to these
    payloads: list[dict] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _FakeServer

    def do_GET(self) -> None:
        self._send_json(200, {"object": "list", "data": [{"id": "fake-model"}]})

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        settings = self.server.settings
        settings.payloads.append(payload)
        max_tokens = payload["max_tokens"]
        if max_tokens in settings.fail_max_tokens:
            self._send_json(500, {"error": {"message": "boom"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        per_chunk = settings.tokens_per_chunk
        for first in range(0, max_tokens, per_chunk):
            text = " tok" * min(per_chunk, max_tokens - first)
            self._event({"choices": [{"index": 0, "text": text, "finish_reason": None}]})
        self._event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        if settings.send_usage and payload.get("stream_options", {}).get("include_usage"):
            usage = {
                "completion_tokens": max_tokens,
                "prompt_tokens_details": {"cached_tokens": settings.cached_tokens},
            }
            self._event({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, chunk: dict) -> None:
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


class _FakeServer(ThreadingHTTPServer):
    settings: FakeServerSettings


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeServerSettings]]:
    server = _FakeServer(("127.0.0.1", 0), _Handler)
    server.settings = FakeServerSettings()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.settings
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def requests_with_outputs(*output_lens: int) -> list[BenchRequest]:
    return [BenchRequest([1, 2, 3], n, text=f"prompt {i}") for i, n in enumerate(output_lens)]


WARMUP = BenchRequest([9], 2, text="warm up")


def run(config: LoadConfig, requests: list[BenchRequest]) -> LoadResult:
    return asyncio.run(run_load(config, requests, WARMUP))


def test_streams_every_request_and_counts_tokens(fake_server) -> None:
    url, settings = fake_server
    result = run(LoadConfig(url, ignore_eos=True), requests_with_outputs(3, 5, 1, 4))
    assert result.model == "fake-model"
    assert [r.error for r in result.records] == [None] * 4
    assert [r.output_tokens for r in result.records] == [3, 5, 1, 4]
    assert [len(r.chunk_times) for r in result.records] == [3, 5, 1, 4]
    assert all(r.start < r.chunk_times[0] <= r.chunk_times[-1] <= r.end for r in result.records)
    assert result.duration_s >= max(r.end for r in result.records)
    sent = settings.payloads[1:]  # after the warmup
    assert sorted(p["prompt"] for p in sent) == [f"prompt {i}" for i in range(4)]
    for payload in sent:
        assert payload["model"] == "fake-model"
        assert payload["stream"] is True
        assert payload["ignore_eos"] is True
        assert payload["min_tokens"] == payload["max_tokens"]


def test_without_ignore_eos_sends_no_min_tokens(fake_server) -> None:
    url, settings = fake_server
    run(LoadConfig(url, model="named"), requests_with_outputs(2))
    assert settings.payloads[-1]["model"] == "named"
    assert "ignore_eos" not in settings.payloads[-1]
    assert "min_tokens" not in settings.payloads[-1]


def test_usage_wins_over_counting_chunks(fake_server) -> None:
    url, settings = fake_server
    settings.tokens_per_chunk = 2
    settings.cached_tokens = 2
    result = run(LoadConfig(url), requests_with_outputs(5))
    assert result.records[0].output_tokens == 5
    assert result.records[0].cached_tokens == 2
    assert len(result.records[0].chunk_times) == 3

    settings.send_usage = False
    result = run(LoadConfig(url), requests_with_outputs(5))
    assert result.records[0].output_tokens == 3  # one token per text chunk, as documented


def test_token_id_prompts(fake_server) -> None:
    url, settings = fake_server
    run(LoadConfig(url, prompt_format="ids"), requests_with_outputs(2))
    assert settings.payloads[-1]["prompt"] == [1, 2, 3]


def test_http_errors_are_counted_not_raised(fake_server) -> None:
    url, settings = fake_server
    settings.fail_max_tokens = {5}
    result = run(LoadConfig(url), requests_with_outputs(3, 5, 3, 5))
    errors = [r.error for r in result.records]
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("HTTP 500") and errors[3].startswith("HTTP 500")


def test_failed_warmup_stops_the_run(fake_server) -> None:
    url, settings = fake_server
    settings.fail_max_tokens = {WARMUP.output_len}
    with pytest.raises(RuntimeError, match="warmup request"):
        run(LoadConfig(url), requests_with_outputs(3))


def test_max_concurrency_one_runs_requests_one_after_another(fake_server) -> None:
    url, _ = fake_server
    result = run(LoadConfig(url, max_concurrency=1), requests_with_outputs(4, 4, 4, 4))
    ordered = sorted(result.records, key=lambda r: r.start)
    assert all(a.end <= b.start for a, b in itertools.pairwise(ordered))


def test_mixed_load_keeps_decodes_going_until_the_arrivals_are_answered(fake_server) -> None:
    url, _ = fake_server
    decodes = requests_with_outputs(*[6] * 200)
    arrivals = [BenchRequest([1] * 9, 2, text=f"long {i}") for i in range(3)]
    config = LoadConfig(url, request_rate=20.0, ignore_eos=True)
    result = asyncio.run(run_mixed_load(config, decodes, arrivals, 2, [WARMUP], lead_s=0.05))
    assert all(r.ok for r in result.records)
    assert [(r.prompt_len, r.output_tokens) for r in result.arrivals] == [(9, 2)] * 3
    assert [r.output_tokens for r in result.decodes] == [6] * len(result.decodes)
    assert result.arrival_times[0] >= 0.05 and result.arrival_times == sorted(result.arrival_times)
    assert all(r.start >= at for r, at in zip(result.arrivals, result.arrival_times, strict=True))
    answered = max(r.end for r in result.arrivals)
    assert all(r.start <= answered for r in result.decodes)
    assert any(r.start >= result.arrival_times[-1] for r in result.decodes)
    # Two decodes in flight at every moment until the last arrival was answered.
    for moment in (0.01, result.arrival_times[0], answered - 0.001):
        assert sum(r.start <= moment < r.end for r in result.decodes) == 2
    with pytest.raises(RuntimeError, match="decodes ran out"):
        asyncio.run(run_mixed_load(config, decodes[:3], arrivals, 2, [WARMUP], lead_s=0.5))
    with pytest.raises(ValueError, match="at least one arrival"):
        asyncio.run(run_mixed_load(config, decodes, [], 2, [WARMUP], lead_s=0.05))


def test_endpoint_must_be_a_path() -> None:
    with pytest.raises(ValueError, match="--endpoint"):
        LoadConfig("http://127.0.0.1:1", endpoint="http://example.com/v1/completions")


def test_arrival_gaps() -> None:
    assert arrival_gaps(4, math.inf, random.Random(0)) == [0.0] * 4
    gaps = arrival_gaps(4000, 8.0, random.Random(1))
    assert gaps[0] == 0.0 and min(gaps[1:]) > 0
    assert sum(gaps) / (len(gaps) - 1) == pytest.approx(1 / 8, rel=0.05)
    assert gaps == arrival_gaps(4000, 8.0, random.Random(1))


def test_cli_prints_table_then_json_and_writes_file_and_plot(fake_server, tmp_path, capsys):
    url, _ = fake_server
    output_file, plot = tmp_path / "serve.jsonl", tmp_path / "serve.png"
    argv = ["bench", "serve", "--base-url", url, "--num-prompts", "4"]
    argv += ["--random-input-len", "8", "--random-output-len", "5", "--random-range-ratio", "1"]
    argv += ["--ignore-eos", "--request-rate", "50", "--output-file", str(output_file)]
    argv += ["--plot", str(plot)]
    assert sluice_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "Serving Benchmark Result" in lines[0]
    assert any(line.startswith("Mean TTFT (ms):") for line in lines)
    record = json.loads(lines[-1])
    assert record["bench"] == "serve" and record["dataset"] == "random"
    assert (record["completed"], record["failed"]) == (4, 0)
    assert (record["input_tokens"], record["output_tokens"]) == (32, 20)
    assert record["request_rate"] == 50.0
    assert output_file.read_text().splitlines() == [lines[-1]]
    assert plot.read_bytes().startswith(b"\x89PNG")
