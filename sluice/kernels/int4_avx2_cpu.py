"""sluice's int4 matmul for CPUs with AVX2 but no AVX512-VNNI (int4_avx2_cpu.cpp): whether it
runs here, and its output shape for torch.compile. It unpacks a tile of weights once for up to
four rows of activations and never scales the weights themselves, where torch's int4pack kernel
does both per weight: faster for one row and for the few rows of a speculative verify step
(docs/benchmarks.md)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sluice.kernels import build

# Output rows per tile of the layout (two AVX2 vectors of fp32 results).
TILE_ROWS = 16


@functools.cache
def available() -> bool:
    """Whether the kernel runs here (AVX2, FMA, F16C); builds it on the first call (once per
    machine)."""
    return build.load_operators(
        "int4_avx2_cpu",
        _has_avx2_fma_f16c(),
        "int4 weights use torch's int4pack kernel",
        {"int4_avx2_linear": _output_like},
    )


def linear(x: Tensor, codes: Tensor, scale_offset: Tensor, group_size: int) -> Tensor:
    """x [M, K] float32 -> x W^T [M, tiles * 16] float32."""
    return torch.ops.sluice.int4_avx2_linear(x, codes, scale_offset, group_size)


def _output_like(x: Tensor, codes: Tensor, scale_offset: Tensor, group_size: int) -> Tensor:
    return x.new_empty(x.shape[0], codes.shape[0] * TILE_ROWS)


def _has_avx2_fma_f16c() -> bool:
    # torch's AVX2 level needs AVX2 and FMA; every CPU with those has F16C.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
