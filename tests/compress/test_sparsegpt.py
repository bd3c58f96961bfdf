"""SparseGPT: the blocked implementation equals a column-by-column OBS reference (with and
without 4-bit rounding), and it reconstructs a layer's output better than magnitude and Wanda
pruning at the same 2:4 density."""

from __future__ import annotations

import torch

from sluice.compress.masks import Sparsity, keep_mask, magnitude_scores, wanda_scores
from sluice.compress.sparsegpt import DEFAULT_DAMPING, sparsegpt

TWO_OF_FOUR = Sparsity.parse("2:4")


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=g)]
    return (torch.randn(tokens, width, generator=g) @ mixing) * scales


def reference_sparsegpt(weight, hessian, quantize_group=None):
    """Straight from the OBS equations: prune (or round) one column at a time, spread its error
    over the later columns with the current inverse Hessian, then eliminate that column from the
    inverse. Masks as the paper: every four columns (with rounding: every group), least
    w^2 / [H^-1]_jj after the columns before j are eliminated."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += DEFAULT_DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    columns = w.shape[1]
    # The eliminated inverse's diagonal does not depend on the weights: compute it up front.
    diag, eliminated = torch.empty(columns, dtype=h.dtype), hinv.clone()
    for j in range(columns):
        diag[j] = eliminated[j, j]
        eliminated -= torch.outer(eliminated[:, j], eliminated[j, :]) / eliminated[j, j]
    step = quantize_group or 4
    pruned = torch.zeros_like(w, dtype=torch.bool)
    low = scale = None
    for i in range(columns):
        if i % step == 0:
            for g in range(i, i + step, 4):
                saliency = w[:, g : g + 4] ** 2 / diag[g : g + 4]
                drop = saliency.topk(2, dim=1, largest=False).indices
                pruned[:, g : g + 4].scatter_(1, drop, True)
            if quantize_group:
                block, gone = w[:, i : i + step].float(), pruned[:, i : i + step]
                low = torch.where(gone, float("inf"), block).amin(1).half().double()
                high = torch.where(gone, float("-inf"), block).amax(1).double()
                scale = ((high - low) / 15).half().double()
        q = torch.where(pruned[:, i], 0.0, w[:, i])
        if quantize_group:
            rounded = torch.round((w[:, i] - low) / scale).clamp(0, 15) * scale + low
            q = torch.where(pruned[:, i], 0.0, rounded)
        error = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= torch.outer(error, hinv[i, i:])
        w[:, i] = q
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return w.float()


def test_pruning_equals_the_column_by_column_reference():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    x = correlated_inputs(256, 32, seed=1)
    hessian = x.T @ x
    ours = sparsegpt(weight, hessian, TWO_OF_FOUR, block_size=8)
    reference = reference_sparsegpt(weight, hessian)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_pruning_with_4_bit_rounding_equals_the_reference():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(256, 64, seed=3)
    hessian = x.T @ x
    ours = sparsegpt(weight, hessian, TWO_OF_FOUR, quantize_group=32, block_size=32)
    reference = reference_sparsegpt(weight, hessian, quantize_group=32)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # Every row's kept values of each group lie on a 16-level grid.
    kept = ours.reshape(16, 2, 32)
    for row, group in ((0, 0), (7, 1), (15, 1)):
        assert len(set(kept[row, group][kept[row, group] != 0].tolist())) <= 16


def test_sparsegpt_reconstructs_the_layer_better_than_magnitude_and_wanda():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(1024, 128, seed=5)
    hessian = x.T @ x

    def error(pruned):
        return ((x @ weight.T - x @ pruned.T) ** 2).sum().item()

    magnitude = weight * keep_mask(magnitude_scores(weight), TWO_OF_FOUR)
    wanda = weight * keep_mask(wanda_scores(weight, torch.diag(hessian).sqrt()), TWO_OF_FOUR)
    ours = sparsegpt(weight, hessian, TWO_OF_FOUR)
    assert (ours == 0).sum() == (magnitude == 0).sum() == weight.numel() // 2
    assert error(ours) < error(wanda) < error(magnitude)
