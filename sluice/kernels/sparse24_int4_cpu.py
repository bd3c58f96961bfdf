"""sluice's 2:4 sparse int4 matmul for CPUs with AVX2 and FMA (sparse24_int4_cpu.cpp): whether it
runs here, and its output shapes for torch.compile. Elsewhere exactly 2:4 weights run as dense
int4."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sluice.kernels import build


@functools.cache
def available() -> bool:
    """Whether the kernel runs here (an x86 CPU with AVX2); builds it on the first call (once
    per machine)."""
    return build.load_operators(
        "sparse24_int4_cpu",
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"),
        "2:4 sparse weights run as dense int4",
        {"sparse24_int4_linear": _linear_like, "sparse24_int4_dequantize": _dense_like},
    )


def linear(
    x: Tensor, codes: Tensor, index: Tensor, scale_offset: Tensor, group: int, rows: int
) -> Tensor:
    """x [M, K] -> x W^T [M, rows] in x's dtype (computed in float32)."""
    return torch.ops.sluice.sparse24_int4_linear(x, codes, index, scale_offset, group, rows)


def dequantize(codes: Tensor, index: Tensor, scale_offset: Tensor, group: int, rows: int) -> Tensor:
    """The weight as the kernel sees it: float32 [rows, K], zeros where it keeps nothing."""
    return torch.ops.sluice.sparse24_int4_dequantize(codes, index, scale_offset, group, rows)


def _linear_like(
    x: Tensor, codes: Tensor, index: Tensor, scale_offset: Tensor, group: int, rows: int
) -> Tensor:
    return x.new_empty(x.shape[0], rows)


def _dense_like(
    codes: Tensor, index: Tensor, scale_offset: Tensor, group: int, rows: int
) -> Tensor:
    return codes.new_empty(rows, codes.shape[1] * 2, dtype=torch.float32)
