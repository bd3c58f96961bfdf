"""How every benchmark reports: one JSON line, last on stdout, optionally appended to a file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

Record = dict[str, object]


def emit(record: Record, output_file: str | Path | None = None) -> None:
    line = json.dumps(_json_safe(record))
    print(line, flush=True)
    if output_file is not None:
        with open(output_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _json_safe(record: Record) -> Record:
    """JSON has no infinity: an unlimited request rate is written as the string "inf"."""
    return {
        key: "inf" if isinstance(value, float) and math.isinf(value) else value
        for key, value in record.items()
    }


def format_table(title: str, rows: Sequence[tuple[str, object] | str]) -> str:
    """A fixed-width, two-column summary in the style of vLLM's bench_serving; a bare string
    among the rows starts a section."""
    width = 52
    lines = [f" {title} ".center(width, "=")]
    for row in rows:
        if isinstance(row, str):
            lines.append(f" {row} ".center(width, "-"))
            continue
        label, value = row
        lines.append(f"{label + ':':<40}{_shown(value):>12}")
    lines.append("=" * width)
    return "\n".join(lines)


def _shown(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)
