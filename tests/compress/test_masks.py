"""Masks: 2:4 keeps exactly two of every four inputs; Wanda's choice is the per-group top-2 of
|W| * ||X||, checked by brute force over every pair."""

from __future__ import annotations

import itertools

import pytest
import torch

from sluice.compress.masks import Sparsity, keep_mask, magnitude_scores, wanda_scores


def test_two_of_four_keeps_exactly_two_per_group():
    torch.manual_seed(0)
    mask = keep_mask(torch.randn(37, 96).abs(), Sparsity.parse("2:4"))
    assert mask.shape == (37, 96)
    assert (mask.reshape(37, -1, 4).sum(dim=-1) == 2).all()


def test_wanda_mask_is_the_brute_force_best_pair_of_each_group():
    torch.manual_seed(1)
    weight, norms = torch.randn(12, 32), torch.rand(32) * 3
    mask = keep_mask(wanda_scores(weight, norms), Sparsity.parse("2:4"))
    for row in range(12):
        for group in range(8):
            cols = range(4 * group, 4 * group + 4)
            score = {c: abs(weight[row, c].item()) * norms[c].item() for c in cols}
            best = max(itertools.combinations(cols, 2), key=lambda p: score[p[0]] + score[p[1]])
            assert {c for c in cols if mask[row, c]} == set(best)


def test_wanda_and_magnitude_differ_when_inputs_differ_in_size():
    torch.manual_seed(2)
    weight, norms = torch.randn(16, 64), torch.logspace(-2, 2, 64)[torch.randperm(64)]
    sparsity = Sparsity.parse("2:4")
    wanda = keep_mask(wanda_scores(weight, norms), sparsity)
    magnitude = keep_mask(magnitude_scores(weight), sparsity)
    assert not torch.equal(wanda, magnitude)


def test_unstructured_prunes_the_fraction_of_each_row():
    torch.manual_seed(3)
    mask = keep_mask(torch.rand(5, 100), Sparsity.parse("unstructured:0.3"))
    assert (mask.sum(dim=1) == 70).all()


@pytest.mark.parametrize("text", ["1:4", "unstructured:1.5", "unstructured", "dense"])
def test_bad_sparsity_is_refused_by_name(text):
    with pytest.raises(ValueError, match="sparsity"):
        Sparsity.parse(text)
