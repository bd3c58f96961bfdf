"""Write sluice/eval/data/python_names.jsonl, the likelihood task `sluice eval` ships: given the
first line of a Python function's docstring, pick the function's name among four (the other three
drawn from the same module). Public domain in effect: Python's own docstrings (PSF licence).

    python scripts/make_choice_task.py   # deterministic for a given Python version
"""

from __future__ import annotations

import builtins
import inspect
import json
import math
import os.path
import random
import string
from pathlib import Path

OUTPUT = Path(__file__).parent.parent / "sluice" / "eval" / "data" / "python_names.jsonl"
CHOICES = 4


def documented_functions(namespace: object, label: str, prefix: str) -> list[tuple[str, str, str]]:
    """(label, name, first docstring line) for public callables whose docstring's first line is a
    sentence, not a signature."""
    found = []
    for name in sorted(dir(namespace)):
        value = getattr(namespace, name)
        doc = inspect.getdoc(value) if callable(value) and not name.startswith("_") else None
        if not doc or inspect.isclass(value):
            continue
        first = doc.strip().splitlines()[0].strip()
        if first and first[0].isupper() and first.endswith(".") and name not in first:
            found.append((label, prefix + name, first))
    return found


def main() -> None:
    rng = random.Random(0)
    sources = [
        (builtins, "Python's built-in function", ""),
        (str, "The Python string method", "str."),
        (math, "The function of Python's math module", "math."),
        (os.path, "The function of Python's os.path module", "os.path."),
        (string, "The function of Python's string module", "string."),
    ]
    lines = []
    for namespace, label, prefix in sources:
        functions = documented_functions(namespace, label, prefix)
        names = [name for _, name, _ in functions]
        for label_text, name, doc in functions:
            others = rng.sample([n for n in names if n != name], CHOICES - 1)
            choices = [name, *others]
            rng.shuffle(choices)
            context = f'{label_text} documented as "{doc}" is called'
            item = {
                "context": context,
                "choices": [f" {choice}" for choice in choices],
                "answer": choices.index(name),
            }
            lines.append(json.dumps(item))
    OUTPUT.write_text("\n".join(lines) + "\n")
    print(f"{OUTPUT}: {len(lines)} items")


if __name__ == "__main__":
    main()
