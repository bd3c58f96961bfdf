"""sluice's activation-sparse MLP kernels on 4-bit weights (sparse_mlp_cpu.cpp): a gathered-rows
GEMV for the gate and up projections and a gathered-columns down projection, for any CPU (AVX2
is enough). Without a C++ compiler (or with SLUICE_NATIVE_KERNELS=0) the sparse MLP runs on
dense weights through torch ops instead."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sluice.kernels import build


@functools.cache
def available() -> bool:
    """Whether the kernels run here; builds them on the first call (once per machine)."""
    return build.load_operators(
        "sparse_mlp_cpu",
        True,
        "the sparse MLP gathers dequantized weights with torch ops",
        {"gathered_gate_up": _per_row, "gathered_down": _per_output},
    )


def gathered_gate_up(
    x: Tensor, codes: Tensor, scale_offset: Tensor, rows: Tensor, threshold: float
) -> Tensor:
    """silu(gate . x) * (up . x) [n] for the neurons stored at `rows`, zero where |h| <= threshold;
    x float32 [hidden]."""
    return torch.ops.sluice.gathered_gate_up(x, codes, scale_offset, rows, threshold)


def gathered_down(
    h: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor, rows: Tensor, groups: Tensor
) -> Tensor:
    """sum_k h[k] * (down column of the neuron stored at rows[k], in scale group groups[k])."""
    return torch.ops.sluice.gathered_down(h, codes, scales, offsets, rows, groups)


def _per_row(x: Tensor, codes: Tensor, scale_offset: Tensor, rows: Tensor, threshold: float):
    return x.new_empty(rows.shape[0])


def _per_output(h, codes, scales, offsets, rows, groups):
    return h.new_empty(codes.shape[1] * 2)
