"""`sluice eval`: perplexity on a text and a likelihood task for any model sluice loads, dense or
compressed; one JSON line out."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHIPPED_TASK = Path(__file__).parent / "data" / "python_names.jsonl"
PYDOC_TEXT = "pydoc"


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="perplexity and a likelihood task: the accuracy gate",
        description="Prints one JSON line: perplexity (sliding windows) on --text and acc / "
        "acc_norm on --task.",
    )
    add_model_args(parser)
    parser.add_argument(
        "--text",
        default=PYDOC_TEXT,
        help="'pydoc' (Python's own pydoc_data topics, ~113k tokens, on every machine) or a text "
        "file; 'none' skips perplexity",
    )
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument(
        "--stride", type=int, default=None, help="tokens between window starts (default: window)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="score only the text's first N tokens"
    )
    parser.add_argument(
        "--task",
        default=str(SHIPPED_TASK),
        help="multiple-choice JSONL ({context, choices, answer}); default: the shipped "
        "python_names task; 'none' skips it",
    )
    parser.add_argument("--max-items", type=int, default=None, help="the task's first N items")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--output-file", default=None, help="also append the JSON line here")
    parser.set_defaults(func=main)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from sluice.cli import add_model_options

    group = parser.add_argument_group("model")
    add_model_options(group)
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def load(args: argparse.Namespace):
    import torch

    from sluice.config import resolve_device, resolve_dtype
    from sluice.loaders.model_path import resolve_model
    from sluice.models.registry import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return load_model(
        resolve_model(args.model), device, resolve_dtype(args.dtype, device), args.quantization
    )


def text_of(name: str) -> tuple[str, str]:
    """(label, text) of --text."""
    if name == PYDOC_TEXT:
        from pydoc_data.topics import topics

        return "pydoc_data.topics", "\n\n".join(topics[key] for key in sorted(topics))
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--text {name!r}: not 'pydoc' and no such file")
    return path.name, path.read_text(encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    from sluice.compress.checkpoint import num_weight_bytes
    from sluice.eval.likelihood import evaluate_choices, read_choice_task
    from sluice.eval.perplexity import perplexity

    start = time.perf_counter()
    try:
        text = None if args.text == "none" else text_of(args.text)
        items = None if args.task == "none" else read_choice_task(Path(args.task))
    except (OSError, ValueError) as error:
        print(f"sluice eval: {error}", file=sys.stderr)
        return 2
    loaded = load(args)
    result: dict = {
        "model": args.model,
        "quantization": args.quantization,
        "weight_bytes": num_weight_bytes(loaded.model),
    }
    if text is not None:
        ids = loaded.tokenizer.encode(text[1])[: args.max_tokens]
        ppl = perplexity(loaded, ids, args.window, args.stride, progress=args.progress)
        result.update(
            text=text[0],
            tokens=len(ids),
            window=args.window,
            stride=args.stride or args.window,
            perplexity=ppl,
        )
    if items is not None:
        scores = evaluate_choices(loaded, items[: args.max_items], progress=args.progress)
        result.update(task=Path(args.task).stem, **scores)
    result["seconds"] = round(time.perf_counter() - start, 1)
    line = json.dumps(result)
    print(line)
    if args.output_file:
        with open(args.output_file, "a") as out:
            out.write(line + "\n")
    return 0
