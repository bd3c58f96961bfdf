"""sluice's int4 matmul for CPUs with AVX512-VNNI (int4_cpu.cpp): whether it runs here, and its
output shape for torch.compile. Elsewhere int4 weights use torch's int4pack kernel."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sluice.kernels import build

# Output rows per tile of the packed layout (one AVX-512 vector of fp32 results).
TILE_ROWS = 16
# Inputs per stored chunk of a tile (64 bytes: 8 codes for each of the 16 rows).
CHUNK_INPUTS = 8


@functools.cache
def available() -> bool:
    """Whether sluice's int4 kernel runs here (AVX512-VNNI); builds it on the first call (once
    per machine)."""
    return build.load_operators(
        "int4_cpu",
        torch.cpu._is_vnni_supported(),
        "int4 weights use torch's int4pack kernel",
        {"int4_linear": _output_like},
    )


def linear(x: Tensor, codes: Tensor, scale_offset: Tensor, group_size: int, passes: int) -> Tensor:
    """x [M, K] float32/bfloat16 -> x W^T [M, tiles * 16] in x's dtype, with x quantized to int8
    in `passes` (1 or 2) passes (see int4_cpu.cpp)."""
    return torch.ops.sluice.int4_linear(x, codes, scale_offset, group_size, passes)


def _output_like(
    x: Tensor, codes: Tensor, scale_offset: Tensor, group_size: int, passes: int
) -> Tensor:
    return x.new_empty(x.shape[0], codes.shape[0] * TILE_ROWS)
