"""RMSNorm and its variants, computed in float32 whatever the activation dtype, as the references do.

- RMSNorm: x / rms(x) * weight (Llama, Qwen3).
- ZeroCenteredRMSNorm: x / rms(x) * (1 + weight); Qwen3-Next stores the weight as an offset from 1.
- GatedRMSNorm: x / rms(x) * weight * silu(z), the output norm of a Gated DeltaNet mixer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in float32. One fused op: a decode step runs 60 of these."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * _rms_normalize(x, self.eps).to(x.dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.weight.data.zero_()  # identity until loaded, as for RMSNorm's ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is applied in float32 before the cast back, unlike RMSNorm (as the reference).
        return (_rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (super().forward(x) * F.silu(z.float())).to(x.dtype)
