"""`sluice compress`: prune a loaded model layer by layer (magnitude, Wanda or SparseGPT), then
round what remains to 4 bits, in place on its dense weights.

Layer by layer, as SparseGPT does: the calibration tokens' hidden states enter a layer, its
linears' input Hessians are gathered, its linears are pruned, and the layer is run again so the
next one sees the pruned layer's outputs. Memory: the model, one layer's Hessians and the
hidden states of the calibration tokens.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sluice.compress.calibration import input_hessians, linears_of
from sluice.compress.masks import Sparsity, keep_mask, magnitude_scores, wanda_scores
from sluice.compress.sparsegpt import sparsegpt
from sluice.eval.forward import prompts_context
from sluice.layers.sparse24 import DEFAULT_GROUP_SIZE, quantize_two_of_four
from sluice.models.base import CausalLM

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class CompressionConfig:
    method: Method
    sparsity: Sparsity
    quantize_int4: bool = False
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.quantize_int4 and not self.sparsity.structured:
            raise ValueError(
                "--quantize int4 needs --sparsity 2:4: only 2:4 weights have a kernel that "
                "skips the zeros"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    def describe(self) -> dict:
        return {
            "method": self.method,
            "sparsity": str(self.sparsity),
            "quantize": "int4" if self.quantize_int4 else None,
            "group_size": self.group_size,
        }


Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@torch.inference_mode()
def compress_model(
    model: CausalLM,
    config: CompressionConfig,
    sequences: list[list[int]] | None,
    progress: Progress = _stderr,
) -> None:
    """Prune (and quantize) every decoder layer's linears; `sequences` are the calibration
    token ids (unused by magnitude pruning)."""
    if config.needs_calibration and not sequences:
        raise ValueError(f"{config.method} needs calibration text")
    if model.config.is_hybrid:
        raise ValueError("compress runs attention-only models (llama, qwen3)")
    ctx = prompts_context(model, sequences) if config.needs_calibration else None
    hidden = model.embed_tokens(torch.tensor([t for s in sequences for t in s])) if ctx else None
    layers = len(model.layers)
    for index, layer in enumerate(model.layers):
        start = time.perf_counter()
        linears = linears_of(layer)
        hessians: dict[str, Tensor] = {}
        if ctx is not None:
            with input_hessians(linears) as hessians:
                layer(hidden, ctx)
        for name, linear in linears.items():
            linear.weight.data = compressed_weight(linear.weight.data, hessians.get(name), config)
        if ctx is not None:
            hidden = layer(hidden, ctx)
        progress(
            f"layer {index + 1}/{layers}: {', '.join(linears)} {config.method} "
            f"{config.sparsity}{' + int4' if config.quantize_int4 else ''} "
            f"({time.perf_counter() - start:.1f} s)"
        )


def compressed_weight(weight: Tensor, hessian: Tensor | None, config: CompressionConfig) -> Tensor:
    """One linear's weight pruned by `config.method` (and rounded to 4 bits)."""
    if config.method == "sparsegpt":
        group = config.group_size if config.quantize_int4 else None
        pruned = sparsegpt(weight, hessian, config.sparsity, quantize_group=group)
    else:
        scores = (
            wanda_scores(weight, torch.diag(hessian).sqrt())
            if config.method == "wanda"
            else magnitude_scores(weight)
        )
        pruned = weight.float() * keep_mask(scores, config.sparsity)
    # The loader's own quantizer has the last word, so the checkpoint holds what will run.
    return quantize_two_of_four(pruned, config.group_size) if config.quantize_int4 else pruned
