"""Sparse mixture of experts: a softmax router sends each token to its top-k experts, whose
outputs are summed with the router weights; an optional shared expert sees every token and is
scaled by its own sigmoid gate (Qwen2-MoE, Qwen3-Next).

Experts are built by the model (`make_expert(intermediate_size)`, its own MLP class), so that the
checkpoint names `experts.{i}.*` and `shared_expert.*` load like any other MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sluice.config import MoEConfig
from sluice.layers.linear import Linear


def is_sparse_layer(config: MoEConfig | None, layer_index: int) -> bool:
    """Whether layer `layer_index` has a sparse MoE block rather than a dense MLP."""
    if config is None or config.num_experts == 0 or layer_index in config.dense_layers:
        return False
    return (layer_index + 1) % config.sparse_step == 0


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        config: MoEConfig,
        make_expert: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_token
        self.normalize_top_k = config.normalize_top_k
        self.gate = Linear(hidden_size, config.num_experts)  # the router
        self.experts = nn.ModuleList(
            make_expert(config.expert_intermediate_size) for _ in range(config.num_experts)
        )
        shared_size = config.shared_expert_intermediate_size
        self.shared_expert = make_expert(shared_size) if shared_size else None
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        weights, chosen = self._route(x)
        out = torch.zeros_like(x)
        # One batched call per expert over the tokens that chose it, not one per token.
        for expert in chosen.unique().tolist():
            token, rank = (chosen == expert).nonzero(as_tuple=True)
            expert_out = self.experts[expert](x[token]) * weights[token, rank, None]
            out.index_add_(0, token, expert_out)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> each token's top-k expert weights and ids, both [T, top_k]."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen
