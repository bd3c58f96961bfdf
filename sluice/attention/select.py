"""Which attention backend an engine runs, decided once at its start."""

from __future__ import annotations

import torch

from sluice.attention.backend import AttentionBackend
from sluice.attention.flex import FlexBackend
from sluice.attention.paged import PagedBackend
from sluice.attention.sdpa import SdpaBackend
from sluice.kernels import attention_cpu


def select_backend(head_dim: int, device: torch.device, compiled: bool) -> AttentionBackend:
    """Compiled steps read pages in place through a paged kernel: sluice's own on CPUs with
    AVX-512 where it has the head size (`kernels/attention_cpu.cpp`), elsewhere inductor's
    tensor ops (C++ on the CPU). Eager steps gather pages for SDPA. On CUDA, FlexAttention's
    fused kernel reads the pages in place (block masks from the page tables), compiled or not."""
    if device.type == "cuda":
        return FlexBackend(compiled=True)
    if not compiled:
        return SdpaBackend()
    native = (
        device.type == "cpu" and head_dim in attention_cpu.HEAD_DIMS and attention_cpu.available()
    )
    return PagedBackend(native)
