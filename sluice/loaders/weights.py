"""What a loader hands the model for one checkpoint tensor: dense, or GGUF blocks kept raw."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

_DEQUANTIZE_CHUNK_VALUES = 1 << 22


@dataclass
class GGUFQuantTensor:
    """A quantized GGUF matrix as stored: `blocks` is uint8 [rows, bytes_per_row], rows independent."""

    qtype: GGMLQuantizationType
    blocks: np.ndarray
    shape: tuple[int, int]  # (out, in), PyTorch order

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], dequantized a few MB of rows at a time: in one go, gguf's numpy
        temporaries would cost several times the result (~0.4 GB for an embedding table)."""
        out = torch.empty(self.shape, dtype=torch.float32)
        rows_per_chunk = max(1, _DEQUANTIZE_CHUNK_VALUES // self.shape[1])
        for start in range(0, self.shape[0], rows_per_chunk):
            rows = self.blocks[start : start + rows_per_chunk]
            values = dequantize(rows, self.qtype).reshape(len(rows), self.shape[1])
            out[start : start + len(rows)] = torch.from_numpy(values)
        return out

    def permute_rows(self, order: np.ndarray) -> GGUFQuantTensor:
        return GGUFQuantTensor(self.qtype, self.blocks[order], self.shape)


WeightSource = torch.Tensor | GGUFQuantTensor


def to_dense(source: WeightSource) -> torch.Tensor:
    return source.dequantize() if isinstance(source, GGUFQuantTensor) else source


def row_slices(source: WeightSource, rows: int) -> Iterator[torch.Tensor]:
    """The matrix as float32 slices of `rows` rows, GGUF blocks dequantized a slice at a time."""
    for start in range(0, source.shape[0], rows):
        if isinstance(source, GGUFQuantTensor):
            blocks = source.blocks[start : start + rows]
            yield GGUFQuantTensor(source.qtype, blocks, (len(blocks), source.shape[1])).dequantize()
        else:
            yield source[start : start + rows].float()


def concat_rows(sources: list[WeightSource]) -> WeightSource:
    """Stack matrices along the output dim; raw GGUF blocks stay raw when their types agree."""
    if len(sources) == 1:
        return sources[0]
    first = sources[0]
    if isinstance(first, GGUFQuantTensor) and all(
        isinstance(s, GGUFQuantTensor) and s.qtype == first.qtype for s in sources
    ):
        rows = sum(s.shape[0] for s in sources)
        return GGUFQuantTensor(
            first.qtype, np.concatenate([s.blocks for s in sources]), (rows, first.shape[1])
        )
    return torch.cat([to_dense(s) for s in sources], dim=0)
