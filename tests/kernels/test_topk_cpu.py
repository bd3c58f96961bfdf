"""sluice's top-k selection (kernels/topk_cpu.cpp) against torch.topk."""

from __future__ import annotations

import pytest
import torch

from sluice.kernels import topk_cpu

pytestmark = pytest.mark.skipif(
    not topk_cpu.available(), reason="sluice's top-k kernel does not build on this machine"
)


def selected(x: torch.Tensor, k: int) -> list[list[int]]:
    return topk_cpu.top_k_indices(x, k).sort(-1).values.tolist()


def expected(x: torch.Tensor, k: int) -> list[list[int]]:
    return x.topk(k, dim=-1).indices.sort(-1).values.tolist()


@pytest.mark.parametrize(("n", "k"), [(49152, 256), (1000, 256), (100, 256 // 4), (7, 7), (5, 1)])
def test_selects_what_torch_topk_selects(n, k) -> None:
    """Logit-like rows (a heavy top, distinct values), rows shorter than k blocks of 64, k = n."""
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=generator) * 3
    x[1] = x[1].abs() ** 3  # one heavy tail
    x[2] = -x[2].abs()  # all negative
    assert selected(x, k) == expected(x, k)


def test_infinities_and_nan_are_ordered_as_torch_orders_them() -> None:
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1))
    x[0, :4000] = float("-inf")  # masked tokens, more than k of them
    x[1, [3, 4000]] = float("inf")
    x[2, [10, 20, 4999]] = float("nan")  # NaN counts as the largest
    assert selected(x, 300) == expected(x, 300)


def test_bad_operands_are_named() -> None:
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match=r"k = 11 must lie in \[1, 10\]"):
        topk_cpu.top_k_indices(x, 11)
    with pytest.raises(RuntimeError, match="must be float32"):
        topk_cpu.top_k_indices(x.double(), 2)
