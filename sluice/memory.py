"""Host memory that is only resident once it is used, and giving the loader's leftovers back.

The KV pool and the state pool are sized for the worst case but mostly hold a few requests:
`lazy_zeros` takes them from calloc, whose fresh pages the kernel maps on first write, so
resident memory follows the pages actually written rather than the budget. `torch.zeros` would
write every byte up front.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of `shape`; on the CPU, resident only where written."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    raw = torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8))  # calloc: zero pages on demand
    return raw.view(dtype).view(shape)


def release_freed_heap() -> None:
    """Return the heap that loading freed to the OS (glibc keeps it otherwise: ~100 MB of
    dequantization and conversion temporaries for the default model)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
