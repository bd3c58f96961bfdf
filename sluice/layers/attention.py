"""Softmax attention over the paged KV cache, as a layer sees it: a call to the step's backend.

The layer holds no cache and no step state: the forward context gives it the step's metadata,
the KV cache (where its pools are found by `layer_index`, its index among the model's attention
layers) and the backend chosen at engine start (`attention/`), which writes the new keys and
values and attends.
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.layers.forward_context import ForwardContext


class PagedAttention(nn.Module):
    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]; returns [T, heads * dim]."""
        return ctx.backend.forward(self.layer_index, q, k, v, self.scale, ctx)
