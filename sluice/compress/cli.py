"""`sluice compress`: prune a model 2:4 (or unstructured) by magnitude, Wanda or SparseGPT, round
the rest to 4 bits, and write a checkpoint sluice loads."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sluice.eval.cli import add_model_args, load, text_of


def add_compress_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compress",
        help="2:4 sparsity (+ int4) by magnitude, Wanda or SparseGPT",
        description="Starts from any model sluice loads (dequantized to float32), prunes every "
        "decoder layer's linears, and writes safetensors + config + tokenizer to -o.",
    )
    add_model_args(parser)
    parser.set_defaults(quantization="none", dtype="float32", device="cpu")
    parser.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", default="2:4", help="'2:4' or 'unstructured:F'")
    parser.add_argument(
        "--quantize", choices=["int4"], default=None, help="round the kept weights to 4 bits"
    )
    parser.add_argument(
        "--calibration",
        default="pydoc",
        help="text file of calibration text, or 'pydoc' (Python's pydoc_data topics)",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=int,
        default=1024,
        help="tokens gathered (a few hundred to ~2k)",
    )
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from sluice.compress.calibration import calibration_sequences
    from sluice.compress.checkpoint import save_checkpoint
    from sluice.compress.masks import Sparsity
    from sluice.compress.pipeline import CompressionConfig, compress_model

    start = time.perf_counter()
    try:
        config = CompressionConfig(
            args.method, Sparsity.parse(args.sparsity), args.quantize == "int4"
        )
        text = text_of(args.calibration)[1] if config.needs_calibration else None
    except ValueError as error:
        print(f"sluice compress: {error}", file=sys.stderr)
        return 2
    if args.quantization != "none" or args.dtype != "float32":
        print(
            "sluice compress: weights are pruned in float32 (--quantization none)", file=sys.stderr
        )
        return 2
    loaded = load(args)
    sequences = None
    if text is not None:
        ids = loaded.tokenizer.encode(text)
        sequences = calibration_sequences(ids, args.calibration_tokens, args.sequence_length)
    compress_model(loaded.model, config, sequences)
    save_checkpoint(loaded, args.output, config.describe())
    print(f"wrote {args.output} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
