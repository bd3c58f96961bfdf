"""Statistical top-k (as Gemma 3n's activation sparsity): keep about k of a token's d neurons
without sorting, by a threshold drawn from the token's own gate activations taken as Gaussian."""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import Tensor


def statistical_threshold(gate: Tensor, keep_fraction: float) -> Tensor:
    """mean + std * inverse-normal-CDF(1 - k/d) of each row of `gate` [..., d]: [..., 1]."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    if keep_fraction == 1.0:
        return torch.full_like(gate[..., :1], -torch.inf)
    z = NormalDist().inv_cdf(1.0 - keep_fraction)
    std, mean = torch.std_mean(gate, dim=-1, keepdim=True)
    return mean + std * z


def statistical_top_k_mask(gate: Tensor, keep_fraction: float) -> Tensor:
    """True for the neurons whose gate activation exceeds the row's statistical threshold."""
    return gate > statistical_threshold(gate, keep_fraction)
