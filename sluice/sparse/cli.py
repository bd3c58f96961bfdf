"""`sluice calibrate-sparsity`: a sparsity profile (thresholds, predictors) for a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    from sluice.cli import add_engine_args  # here: sluice.cli imports this module

    parser = sub.add_parser(
        "calibrate-sparsity",
        help="find per-layer MLP activation thresholds for a CETT target (and train predictors)",
    )
    parser.add_argument("--cett", type=float, required=True, help="target CETT, e.g. 0.1")
    parser.add_argument(
        "--text",
        type=Path,
        default=None,
        help="calibration text file (default: Python's own pydoc topic help, shipped with it)",
    )
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    parser.add_argument(
        "--predictor-rank",
        type=int,
        default=0,
        help="train a low-rank active-neuron predictor of this rank per layer (0: none)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="profile to write")
    add_engine_args(parser, compile_default=False)
    parser.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sluice.config import EngineConfig
    from sluice.loaders.model_path import resolve_model
    from sluice.models.registry import load_model
    from sluice.sparse.calibrate import calibrate, shipped_text

    if args.tokens < 2:
        print("sluice: --tokens must be at least 2", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(model=args.model, quantization=args.quantization, dtype=args.dtype)
    device = config.torch_device()
    loaded = load_model(
        resolve_model(config.model), device, config.torch_dtype(device), config.quantization
    )
    text = args.text.read_text() if args.text else shipped_text()
    token_ids = loaded.tokenizer.encode(text)[: args.tokens]
    profile = calibrate(loaded, token_ids, args.cett, args.predictor_rank, progress=True)
    profile.save(args.output)
    for i, layer in enumerate(profile.layers):
        quality = layer.predictor
        predicted = (
            f", predictor recall {quality.recall:.3f} precision {quality.precision:.3f}"
            if quality
            else ""
        )
        print(
            f"layer {i:2d}: sparsity {layer.sparsity:.1%} (CETT {layer.cett:.3f}){predicted}",
            file=sys.stderr,
        )
    print(f"mean sparsity {profile.mean_sparsity:.1%}; wrote {args.output}", file=sys.stderr)
    return 0
