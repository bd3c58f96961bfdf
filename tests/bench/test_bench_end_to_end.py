"""`sluice bench ...` run as users run it, on the default model, with tiny workloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from server.live_server import MODEL_NAME, start_server  # tests/ is on sys.path (conftest)

from sluice.bench.datasets import BenchRequest, load_tokenizer, random_id_requests

pytestmark = pytest.mark.slow

# The tests and other processes share the cores; OpenMP threads that spin-wait for a busy core
# make every step many times slower.
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--num-prompts", "4", "--input-len-min", "8", "--input-len-max", "16"]
TINY += ["--output-len-min", "4", "--output-len-max", "8", "--seed", "3"]
# In-process benches run uncompiled: these tests check what they report; the compiled step has
# tests of its own, and a cold compile in each subprocess would cost minutes.
EAGER = "--no-compile"


def run_bench(*argv: str) -> dict:
    """Run `sluice bench ARGV`; its JSON line, which must be the last line on stdout."""
    command = [sys.executable, "-m", "sluice.cli", "bench", *argv]
    done = subprocess.run(command, env=_ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_workload() -> list[BenchRequest]:
    """What `TINY` asks for, rebuilt here to know the exact token counts."""
    return random_id_requests(load_tokenizer(None), 4, (8, 16), (4, 8), seed=3)


@pytest.mark.parametrize("backend", ["sluice", "transformers"])
def test_offline(backend: str, tiny_workload: list[BenchRequest]) -> None:
    record = run_bench("offline", "--backend", backend, "--batch-size", "2", *TINY, EAGER)
    assert record["bench"] == "offline" and record["backend"] == backend
    assert record["model"] == MODEL_NAME
    assert record["num_requests"] == 4 and record["batch_size"] == 2
    assert record["input_tokens"] == sum(r.prompt_len for r in tiny_workload)
    assert record["output_tokens"] == sum(r.output_len for r in tiny_workload)
    assert record["output_tok_s"] == pytest.approx(record["output_tokens"] / record["wall_s"])
    total = record["input_tokens"] + record["output_tokens"]
    assert record["total_tok_s"] == pytest.approx(total / record["wall_s"])
    assert record["requests_s"] == pytest.approx(4 / record["wall_s"])


def test_latency() -> None:
    record = run_bench("latency", "--input-len", "16", "--output-len", "6", "--iters", "2", EAGER)
    assert record["bench"] == "latency"
    assert (record["prefill_tokens"], record["decode_tokens"], record["iters"]) == (16, 6, 2)
    assert record["ttft_s"] > 0
    assert record["prefill_tok_s"] == pytest.approx(16 / record["ttft_s"])
    assert record["tpot_ms"] == pytest.approx(1000 / record["decode_tok_s"])


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_speculative(method: str) -> None:
    """The code-edit prompt, whose answer copies from it: drafts are proposed and some accepted,
    and the counts the record gives agree with each other."""
    argv = ["speculative", "--workloads", "code_edit", "--output-len", "24", "--rounds", "2"]
    record = run_bench(
        *argv, "--speculative-method", method, "--num-speculative-tokens", "4", EAGER
    )
    assert (record["bench"], record["workload"], record["method"]) == (
        "speculative",
        "code_edit",
        method,
    )
    assert (record["num_speculative_tokens"], record["rounds"], record["output_len"]) == (4, 2, 24)
    drafts, proposed = record["spec_num_drafts"], record["spec_num_draft_tokens"]
    accepted = record["spec_num_accepted_tokens"]
    assert 0 < accepted <= proposed <= 4 * drafts
    per_position = record["spec_accepted_per_position"]
    assert len(per_position) == 4 and sum(per_position) == accepted
    assert per_position == sorted(per_position, reverse=True)  # the i-th needs the ones before
    assert record["spec_acceptance_rate"] == pytest.approx(accepted / proposed, abs=1e-4)
    assert record["spec_mean_acceptance_length"] == pytest.approx(1 + accepted / drafts, abs=1e-4)
    on, off = record["output_tok_s_on"], record["output_tok_s_off"]
    assert record["speedup"] == pytest.approx(on / off, abs=2e-3)
    rounds = record["speedup_rounds"]
    assert len(rounds) == 2 and min(rounds) <= record["speedup_median"] <= max(rounds)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("bench_serve") / "server.log")
    yield server
    server.stop()


def test_serve_random(server, tmp_path) -> None:
    argv = ["serve", "--base-url", server.url, "--num-prompts", "4", "--max-concurrency", "2"]
    argv += ["--random-input-len", "16", "--random-output-len", "8", "--random-range-ratio", "1"]
    argv += ["--ignore-eos", "--plot", str(tmp_path / "serve.png")]
    record = run_bench(*argv)
    assert record["model"] == MODEL_NAME  # asked of the server's /v1/models
    assert (record["completed"], record["failed"]) == (4, 0), server.log_tail()
    assert (record["input_tokens"], record["output_tokens"]) == (4 * 16, 4 * 8)
    assert record["mean_ttft_ms"] > 0 and record["mean_itl_ms"] > 0
    assert (tmp_path / "serve.png").is_file()


def test_serve_shared_prefix(server) -> None:
    argv = ["serve", "--base-url", server.url, "--dataset-name", "generated-shared-prefix"]
    argv += ["--gsp-num-groups", "2", "--gsp-prompts-per-group", "2"]
    argv += ["--gsp-system-prompt-len", "32", "--gsp-question-len", "8", "--gsp-output-len", "4"]
    argv += ["--ignore-eos", "--request-rate", "20"]
    record = run_bench(*argv)
    assert (record["completed"], record["failed"]) == (4, 0), server.log_tail()
    assert (record["input_tokens"], record["output_tokens"]) == (4 * 40, 4 * 4)
