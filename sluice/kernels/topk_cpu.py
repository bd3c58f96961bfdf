"""sluice's top-k selection for CPUs (topk_cpu.cpp): each row's k largest values' indices,
unsorted, for the output head's shortlist (~3x faster than torch.topk for 32 rows of 49152
logits). Without a C++ compiler (or with SLUICE_NATIVE_KERNELS=0) torch.topk selects."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sluice.kernels import build


@functools.cache
def available() -> bool:
    """Whether the kernel runs here; builds it on the first call (once per machine)."""
    return build.load_operators(
        "topk_cpu", True, "top-k selection runs as torch.topk", {"top_k_indices": _output_like}
    )


def top_k_indices(x: Tensor, k: int) -> Tensor:
    """[rows, k] int64: the indices of each row's k largest values of float32 x [rows, n] on the
    CPU, in no particular order (ties at the k-th value broken either way; NaN counts as the
    largest, as in torch.topk)."""
    return torch.ops.sluice.top_k_indices(x, k)


def _output_like(x: Tensor, k: int) -> Tensor:
    return x.new_empty(x.shape[0], k, dtype=torch.long)
