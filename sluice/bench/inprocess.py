"""What the in-process benchmarks (offline, latency) share: the engine they build and its labels."""

from __future__ import annotations

import argparse

from sluice.api import LLM
from sluice.bench.report import Record
from sluice.cli import engine_kwargs
from sluice.config import resolve_device, resolve_dtype


def load_llm(args: argparse.Namespace) -> LLM:
    """The engine from the command line's engine arguments; loading is never timed."""
    return LLM(**engine_kwargs(args))


def record_header(bench: str, backend: str, args: argparse.Namespace) -> Record:
    """What ran where: the JSON line's first keys, with device and dtype as they resolve here."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return {
        "bench": bench,
        "backend": backend,
        "model": args.model,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": getattr(args, "quantization", None),
    }
