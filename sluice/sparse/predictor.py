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
    inputs: Tensor,
    active: Tensor,
    rank: int,
    target_recall: float = 0.95,
    steps: int = 80,
    seed: int = 0,
) -> LowRankPredictor:
    """Fit a rank-`rank` predictor of `active` [T, I] (bool) from `inputs` [T, hidden] with a
    recall-weighted cross entropy, then shift its bias so that it reaches `target_recall` on
    the training tokens (missing an active neuron costs accuracy; an extra one only time)."""
    inputs = inputs.clone()  # a tensor made in inference mode cannot be saved for backward
    generator = torch.Generator().manual_seed(seed)
    hidden, intermediate = inputs.shape[1], active.shape[1]
    down = (torch.randn(hidden, rank, generator=generator) / hidden**0.5).requires_grad_()
    up = (torch.randn(rank, intermediate, generator=generator) / rank**0.5).requires_grad_()
    bias = torch.zeros(intermediate, requires_grad=True)
    labels = active.float()
    positive = labels.mean().clamp(1e-3, 1 - 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(1 - positive) / positive)
    optimizer = torch.optim.Adam([down, up, bias], lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_fn(torch.addmm(bias, inputs @ down, up), labels)
            loss.backward()
            optimizer.step()
    predictor = LowRankPredictor(down.detach(), up.detach(), bias.detach())
    logits = torch.addmm(predictor.bias, inputs @ predictor.down, predictor.up)
    shift = -torch.quantile(logits[active].float()[:1_000_000], 1.0 - target_recall)
    predictor.bias += shift
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
