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
from collections.abc import Iterator
from contextlib import contextmanager

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
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def share_malloc_arenas() -> None:
    """Make threads started from now on allocate from the malloc arenas that exist, not arenas of
    their own. A model loaded on a thread of its own otherwise stays ~50 MB more resident: glibc
    returns less of a thread arena's freed temporaries than of the main heap's."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, 1)


@contextmanager
def loading_allocations_mapped() -> Iterator[None]:
    """While a model loads and compiles, serve every allocation over 128 KiB by its own mmap.

    glibc's dynamic threshold otherwise rises to the size of the first large block freed, so
    the loader's temporaries and then the weights themselves land in the heap, whose holes
    freed memory cannot leave: ~50 MB more resident for the default model, for good. After
    loading the thresholds are set to where the dynamic ones settle (32 MiB, trim at twice
    that), so a step's buffers are reused from the heap rather than mapped and faulted anew.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None
