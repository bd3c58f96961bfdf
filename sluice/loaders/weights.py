"""What a loader hands the model for one checkpoint tensor: dense, or GGUF blocks kept raw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


@dataclass
class GGUFQuantTensor:
    """A quantized GGUF matrix as stored: `blocks` is uint8 [rows, bytes_per_row], rows independent."""

    qtype: GGMLQuantizationType
    blocks: np.ndarray
    shape: tuple[int, int]  # (out, in), PyTorch order

    def dequantize(self) -> torch.Tensor:
        return torch.from_numpy(dequantize(self.blocks, self.qtype).reshape(self.shape).copy())

    def permute_rows(self, order: np.ndarray) -> GGUFQuantTensor:
        return GGUFQuantTensor(self.qtype, self.blocks[order], self.shape)


WeightSource = torch.Tensor | GGUFQuantTensor


def to_dense(source: WeightSource) -> torch.Tensor:
    return source.dequantize() if isinstance(source, GGUFQuantTensor) else source


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
