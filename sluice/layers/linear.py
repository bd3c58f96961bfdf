"""A linear layer whose weight is dense, or kept quantized with a kernel that runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.loaders.weights import WeightSource, to_dense


class Linear(nn.Module):
    """y = x W^T. Fused projections (QKV, gate/up) are one Linear over stacked rows."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def load(self, source: WeightSource, dtype: torch.dtype) -> None:
        weight = to_dense(source)
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit "
                f"Linear({self.in_features}, {self.out_features})"
            )
        self.weight = nn.Parameter(weight.to(self.weight.device, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
