"""`sluice bench prefix-cache` on tiny contexts: it runs and reports what it says (no timing)."""

from __future__ import annotations

import json

from sluice.cli import main


def test_one_line_per_context_with_step_and_filled_page_stats(capsys) -> None:
    argv = ["bench", "prefix-cache", "--contexts", "64,100", "--steps", "40", "--repeats", "2"]
    assert main([*argv, "--page-size", "16", "--max-num-batched-tokens", "32"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["context"] for r in records] == [64, 100]
    for record in records:
        assert record["bench"] == "prefix-cache" and record["decode_steps"] == 40
        assert 0 < record["step_p50_us"] <= record["step_p99_us"] and record["step_cpu_mean_us"] > 0
        assert 0 < record["filled_page_step_p50_us"] <= record["filled_page_step_p99_us"]
