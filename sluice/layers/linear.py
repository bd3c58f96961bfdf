"""A linear layer whose weight is dense, or kept quantized and run by a quantized kernel."""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sluice.kernels import int4_cpu, sparse24_int4_cpu
from sluice.layers.quant import (
    QUANTIZE_SLICE_ROWS,
    QType,
    QuantizedWeight,
    from_gguf_blocks,
    quantize,
    quantize_row_slices,
)
from sluice.layers.sparse24 import Sparse24Int4Weight, is_two_of_four
from sluice.loaders.weights import GGUFQuantTensor, WeightSource, row_slices, to_dense

logger = logging.getLogger(__name__)

# auto: GGUF weights stay quantized where an exact kernel exists, others are dense.
# none: everything dense (the reference path). int8/int4: dense weights quantized on load (int4:
# exactly 2:4 sparse ones to the 2:4 int4 kernel, where it runs).
Quantization = Literal["auto", "none", "int8", "int4"]
QUANTIZATION_CHOICES = ("auto", "none", "int8", "int4")

_FOUR_BIT_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q4_K)
_dequantized_types: set[str] = set()  # log each fallback type once, not once per layer


class Linear(nn.Module):
    """y = x W^T. Fused projections (QKV, gate/up) are one Linear over stacked rows."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features), requires_grad=False
        )
        self.qweight: QuantizedWeight | None = None

    def load(
        self, source: WeightSource, dtype: torch.dtype, quantization: Quantization = "none"
    ) -> None:
        device = self.weight.device if self.weight is not None else torch.device("cpu")
        self._check_shape(tuple(source.shape))
        qweight = self._quantized(source, device, quantization)
        if qweight is not None:
            self.qweight, self.weight = qweight, None
            return
        self.weight = nn.Parameter(to_dense(source).to(device, dtype), requires_grad=False)

    def load_int4_copy(self, source: WeightSource) -> None:
        """Keep only a 4-bit copy of `source` (for the output head, which ranks the vocabulary
        with it): 4-bit GGUF blocks as they are, anything else quantized a slice of rows at a
        time. No copy where there is no quantized kernel (off the CPU)."""
        self._check_shape(tuple(source.shape))
        if self.weight is not None and self.weight.device.type != "cpu":
            return
        if isinstance(source, GGUFQuantTensor) and source.qtype in _FOUR_BIT_TYPES:
            self.qweight = from_gguf_blocks(source.qtype, source.blocks, source.shape, "cpu")
        else:
            self.qweight = quantize_row_slices(row_slices(source, QUANTIZE_SLICE_ROWS), "int4")
        self.qweight.ranking_only = True
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.matmul(x)
        return F.linear(x, self.weight)

    def _quantized(
        self, source: WeightSource, device: torch.device, quantization: Quantization
    ) -> QuantizedWeight | None:
        if quantization == "none":
            return None
        if isinstance(source, GGUFQuantTensor):
            qweight = from_gguf_blocks(source.qtype, source.blocks, source.shape, device)
            if qweight is None and source.qtype.name not in _dequantized_types:
                _dequantized_types.add(source.qtype.name)
                logger.info(
                    "no %s kernel on %s: dequantizing those weights", source.qtype.name, device
                )
            return qweight
        if quantization == "int4" and device.type == "cpu" and _runs_as_two_of_four(source):
            return Sparse24Int4Weight(source)
        if quantization in ("int8", "int4") and device.type == "cpu":
            return quantize(source.to(device), quantization)
        return None

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {shape} does not fit Linear({self.in_features}, {self.out_features})"
            )


def _runs_as_two_of_four(weight: torch.Tensor) -> bool:
    if not (is_two_of_four(weight) and sparse24_int4_cpu.available()):
        return False
    if int4_cpu.available():
        _warn_two_of_four_is_slower_here()
    return True


@functools.cache
def _warn_two_of_four_is_slower_here() -> None:
    # Once per process: the layers of one checkpoint would repeat it.
    logger.warning(
        "2:4 int4 weights run on sluice's AVX2 2:4 kernel, which on this CPU (AVX512-VNNI) "
        "takes 4-7x the time of its int4 kernel per matmul (docs/benchmarks.md): here the "
        "2:4 checkpoint is smaller than its dense int4 twin, not faster"
    )
