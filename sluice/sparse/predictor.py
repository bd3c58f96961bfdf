"""Deja Vu predictors: per layer, a low-rank network from the MLP's input to which neurons will
be active, so the gate and up projections can be sparse too (a threshold on their product
needs them computed first)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LowRankPredictor:
    """logits = (x @ down) @ up + bias; a neuron is predicted active where its logit > 0."""

    down: Tensor  # [hidden, rank]
    up: Tensor  # [rank, intermediate]
    bias: Tensor  # [intermediate]

    def active(self, x: Tensor) -> Tensor:
        """The neurons predicted active for one token x [hidden]: int64 ids, ascending."""
        return torch.nonzero(self.logits(x) > 0).flatten()

    def logits(self, x: Tensor) -> Tensor:
        """[..., hidden] -> [..., intermediate]."""
        return x @ self.down @ self.up + self.bias

    @classmethod
    def always_active(cls, hidden: int, intermediate: int) -> LowRankPredictor:
        """Recall 1: every neuron predicted active."""
        return cls(torch.zeros(hidden, 1), torch.zeros(1, intermediate), torch.ones(intermediate))


@dataclass(frozen=True)
class PredictorQuality:
    recall: float  # of the truly active neurons, the share predicted active
    precision: float  # of the predicted ones, the share truly active
    keep_fraction: float  # share of neurons predicted active


def train_predictor(
    inputs: Tensor, active: Tensor, rank: int, target_recall: float = 0.95, ridge: float = 1e-2
) -> LowRankPredictor:
    """Fit a rank-`rank` linear predictor of `active` [T, I] (bool) from `inputs` [T, hidden]:
    ridge least squares of the centred labels, truncated to its leading singular directions
    (a closed form: one solve, no training loop on a busy 2-core machine), then shift its bias
    so that it reaches `target_recall` on these tokens (missing an active neuron costs
    accuracy; an extra one only time)."""
    x, labels = inputs.float(), active.float()
    x_mean, label_mean = x.mean(dim=0), labels.mean(dim=0)
    x, labels = x - x_mean, labels - label_mean
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0])
    weight = torch.linalg.solve(gram, x.T @ labels)  # [hidden, I]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    down, up = u[:, :rank] * s[:rank], vh[:rank]
    predictor = LowRankPredictor(
        down.contiguous(), up.contiguous(), label_mean - x_mean @ down @ up
    )
    logits = predictor.logits(inputs.float())
    predictor.bias -= torch.quantile(logits[active][:1_000_000], 1.0 - target_recall)
    return predictor


def predictor_quality(
    predictor: LowRankPredictor, inputs: Tensor, active: Tensor
) -> PredictorQuality:
    predicted = torch.addmm(predictor.bias, inputs @ predictor.down, predictor.up) > 0
    hits = (predicted & active).sum().item()
    return PredictorQuality(
        recall=hits / max(1, active.sum().item()),
        precision=hits / max(1, predicted.sum().item()),
        keep_fraction=predicted.float().mean().item(),
    )
