"""sluice's paged decode attention for CPUs with AVX-512 (attention_cpu.cpp): whether it runs
here, and its output shape for torch.compile. Elsewhere decode attention is the plain tensor ops
of `sluice.layers.attention.paged_decode_attention`, compiled by inductor."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sluice.kernels import build

# The head sizes the kernel is instantiated for (16-lane vectors per head: 1, 2, 4, 8 or 16).
HEAD_DIMS = (16, 32, 64, 128, 256)


@functools.cache
def available() -> bool:
    """Whether the kernel runs here (AVX-512); builds it on the first call (once per machine).
    It serves pools of the head sizes in `HEAD_DIMS`."""
    return build.load_operators(
        "attention_cpu",
        torch.cpu._is_avx512_supported(),
        "decode attention runs as compiled tensor ops",
        {"paged_decode": _output_like},
    )


def paged_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_tables: Tensor,
    kv_lens: Tensor,
    scale: float,
) -> Tensor:
    """q [B, heads, dim], caches [pages, page_size, kv_heads, dim], page_tables [B, P] and kv_lens
    [B] int64 -> [B, heads * dim] float32."""
    return torch.ops.sluice.paged_decode(q, k_cache, v_cache, page_tables, kv_lens, scale)


def _output_like(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, page_tables: Tensor, kv_lens: Tensor, scale: float
) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2], dtype=torch.float32)
