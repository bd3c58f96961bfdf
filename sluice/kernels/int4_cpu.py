"""sluice's int4 matmul for CPUs with AVX512-BF16 (int4_cpu.cpp): whether it runs here, and its
output shape for torch.compile. Elsewhere int4 weights use torch's int4pack kernel."""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from sluice.kernels import build

logger = logging.getLogger(__name__)

# Output rows per tile of the packed layout (one AVX-512 vector of fp32 results).
TILE_ROWS = 16


@functools.cache
def available() -> bool:
    """Whether sluice's int4 kernel runs here; builds it on the first call (once per machine)."""
    if os.environ.get("SLUICE_NATIVE_KERNELS", "1") == "0":
        logger.info("SLUICE_NATIVE_KERNELS=0: int4 weights use torch's int4pack kernel")
        return False
    if not torch.cpu._is_avx512_bf16_supported():
        logger.info("no AVX512-BF16 on this CPU: int4 weights use torch's int4pack kernel")
        return False
    if not build.load("int4_cpu"):
        return False
    torch.library.register_fake("sluice::int4_linear")(_output_like)
    return True


def linear(x: Tensor, codes: Tensor, scale_offset: Tensor, group_size: int) -> Tensor:
    """x [M, K] float32/bfloat16 -> x W^T [M, tiles * 16] in x's dtype (see int4_cpu.cpp)."""
    return torch.ops.sluice.int4_linear(x, codes, scale_offset, group_size)


def _output_like(x: Tensor, codes: Tensor, scale_offset: Tensor, group_size: int) -> Tensor:
    return x.new_empty(x.shape[0], codes.shape[0] * TILE_ROWS)
