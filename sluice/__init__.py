"""sluice: a PyTorch-native LLM inference and serving engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sluice.sampling_params import InvalidParameterError, SamplingParams

if TYPE_CHECKING:
    from sluice.api import LLM, Completion, GenerationResult

__all__ = ["LLM", "Completion", "GenerationResult", "InvalidParameterError", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The engine (torch, model code) loads on first use, so `sluice.engine.scheduler` stays light.
    if name in ("LLM", "Completion", "GenerationResult"):
        from sluice import api

        return getattr(api, name)
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
