"""Which weights to keep: magnitude and Wanda scores, and masks from scores (2:4 or unstructured).

A mask keeps the highest-scoring weights: two of every four along the input dimension of each row
(2:4, the pattern sparse kernels run), or a fraction of each row (unstructured; Wanda compares
within an output row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sparsity:
    """2:4 (two of every four inputs pruned) or unstructured (a fraction of each row pruned)."""

    structured: bool
    fraction: float  # of the weights pruned
    group: int = 4  # inputs per group, 2:4 only

    @classmethod
    def parse(cls, text: str) -> Sparsity:
        if text == "2:4":
            return cls(structured=True, fraction=0.5)
        kind, _, value = text.partition(":")
        if kind == "unstructured" and value:
            fraction = float(value)
            if 0 < fraction < 1:
                return cls(structured=False, fraction=fraction)
        raise ValueError(f"sparsity {text!r}: expected '2:4' or 'unstructured:F' with 0 < F < 1")

    def __str__(self) -> str:
        return "2:4" if self.structured else f"unstructured:{self.fraction:g}"


def magnitude_scores(weight: Tensor) -> Tensor:
    return weight.abs()


def wanda_scores(weight: Tensor, input_norms: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2023): a weight matters as much as its input is large."""
    return weight.abs() * input_norms.reshape(1, -1)


def keep_mask(scores: Tensor, sparsity: Sparsity) -> Tensor:
    """bool [out, in], True where a weight stays."""
    if sparsity.structured:
        return two_of_four_mask(scores)
    pruned = int(scores.shape[1] * sparsity.fraction)
    drop = scores.topk(pruned, dim=1, largest=False).indices
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)


def two_of_four_mask(scores: Tensor) -> Tensor:
    """The two highest scores of every group of four along each row stay."""
    groups = scores.reshape(scores.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(scores.shape)
