from __future__ import annotations

import json
import math

from sluice.bench.report import emit, format_table


def test_emit_prints_one_json_line_and_appends_to_file(tmp_path, capsys) -> None:
    path = tmp_path / "results.jsonl"
    emit({"bench": "x", "rate": math.inf, "value": 1.5}, path)
    emit({"bench": "y"}, path)
    printed = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in printed] == [
        {"bench": "x", "rate": "inf", "value": 1.5},  # JSON has no Infinity
        {"bench": "y"},
    ]
    assert path.read_text().splitlines() == printed


def test_format_table() -> None:
    table = format_table(
        "Result", [("Requests", 4), "Latency", ("Mean (ms)", 1.234), ("P99", None)]
    )
    lines = table.splitlines()
    assert lines[0].strip("= ") == "Result"
    assert lines[1].split() == ["Requests:", "4"]
    assert lines[2].strip("- ") == "Latency"
    assert lines[3].split() == ["Mean", "(ms):", "1.23"]
    assert lines[4].split() == ["P99:", "n/a"]
    assert len({len(line) for line in lines}) == 1  # fixed width
