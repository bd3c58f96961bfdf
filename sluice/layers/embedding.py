"""A table of one row per token, dense or kept as the checkpoint's Q8_0 blocks.

It serves the embedding lookup and, as the output head's table, the exact rescoring of each
logits row's shortlist (layers/logits.py). Q8_0 stores 32 int8 values per fp16 scale; a value
times its scale has at most 8 + 11 significant bits, so dequantizing only the rows a step reads
gives exactly the dense fp32 table's numbers at a quarter of its memory (28 MB instead of
113 MB for the default model's 49152x576 table).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from sluice.layers.quant import GGUF_GROUP_SIZE, q8_0_values_and_scales
from sluice.loaders.weights import GGUFQuantTensor, WeightSource, to_dense


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # Left uninitialised (not resident): the checkpoint's table replaces it.
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim), requires_grad=False
        )
        # The Q8_0 form, when kept: int8 values [num_embeddings, embedding_dim] and float32
        # scales [num_embeddings, embedding_dim / 32]. Buffers, which torch.compile reads in
        # place (plain tensor attributes cost 77 MB more in the compiled default model). Module.to
        # would round the scales to a narrower dtype: the model casts itself before the tables
        # are loaded (CausalLM.load_weights), never after.
        self.register_buffer("values", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.dtype = self.weight.dtype  # of the rows handed out

    def load(self, source: WeightSource, dtype: torch.dtype, keep_q8_0: bool) -> None:
        """Take the checkpoint's table; with `keep_q8_0`, a Q8_0 table stays in its blocks."""
        if tuple(source.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"table of shape {tuple(source.shape)} does not fit "
                f"Embedding({self.num_embeddings}, {self.embedding_dim})"
            )
        device = self.weight.device
        self.dtype = dtype
        if keep_q8_0 and _is_q8_0(source):
            values, scales = q8_0_values_and_scales(source.blocks, source.shape)
            self.values, self.scales = values.to(device), scales.to(device)
            self.weight = None
            return
        self.weight = nn.Parameter(to_dense(source).to(device, dtype), requires_grad=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows at `ids` ([...] -> [..., embedding_dim]), in `dtype`."""
        if self.weight is not None:
            return self.weight[ids]
        groups = self.values[ids].unflatten(-1, (-1, GGUF_GROUP_SIZE)).float()
        return (groups * self.scales[ids].unsqueeze(-1)).flatten(-2).to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def extra_repr(self) -> str:
        form = "dense" if self.weight is not None else "q8_0"
        return f"{self.num_embeddings}, {self.embedding_dim}, {form}"


def _is_q8_0(source: WeightSource) -> bool:
    return isinstance(source, GGUFQuantTensor) and source.qtype == GGMLQuantizationType.Q8_0
