"""The 2:4 int4 kernel (AVX2) against the dense product of the same 4-bit weights: odd shapes,
one row, a few rows (multiplied from the compressed bytes) and wide batches (through a dense
copy), and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.compress.masks import Sparsity, keep_mask, magnitude_scores
from sluice.kernels import sparse24_int4_cpu
from sluice.layers.quant import quantize
from sluice.layers.sparse24 import Sparse24Int4Weight, is_two_of_four, quantize_two_of_four

pytestmark = pytest.mark.skipif(
    not sparse24_int4_cpu.available(), reason="the 2:4 int4 kernel needs an x86 CPU with AVX2"
)


def pruned(rows: int, inputs: int, seed: int) -> torch.Tensor:
    weight = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(seed))
    return weight * keep_mask(magnitude_scores(weight), Sparsity.parse("2:4"))


@pytest.mark.parametrize(("rows", "inputs"), [(37, 96), (1, 32), (130, 576)])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 9, 33])
def test_kernel_equals_the_dense_product_of_its_weights(rows, inputs, batch):
    weight = Sparse24Int4Weight(pruned(rows, inputs, seed=rows))
    x = torch.randn(batch, inputs, generator=torch.Generator().manual_seed(batch))
    expected = F.linear(x, weight.dequantize())
    torch.testing.assert_close(weight.matmul(x), expected, rtol=1e-5, atol=1e-5)


def test_stored_weights_are_the_quantized_kept_values_and_zeros():
    dense = pruned(48, 64, seed=7)
    weight = Sparse24Int4Weight(dense)
    assert torch.equal(weight.dequantize(), quantize_two_of_four(dense))
    assert torch.equal(weight.dequantize() == 0, dense == 0)
    # Already-quantized values quantize onto themselves (what a compressed checkpoint relies on).
    again = Sparse24Int4Weight(weight.dequantize())
    assert torch.equal(again.dequantize(), weight.dequantize())


def test_no_further_from_the_pruned_weights_than_dense_int4_of_them():
    """Both round to 4 bits per group of 32 inputs; dense int4 also spends codes on the zeros."""
    dense = pruned(96, 256, seed=8)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(9))
    exact = F.linear(x, dense)

    def error(product):
        return ((product - exact).norm() / exact.norm()).item()

    sparse, dense_int4 = (
        error(Sparse24Int4Weight(dense).matmul(x)),
        error(quantize(dense, "int4").matmul(x)),
    )
    assert sparse < dense_int4 < 0.1


def test_a_quarter_fewer_bytes_than_dense_int4():
    dense = pruned(576, 1536, seed=10)
    ratio = Sparse24Int4Weight(dense).nbytes() / quantize(dense, "int4").nbytes()
    assert ratio == pytest.approx(0.8, abs=0.01)  # 16 bytes per 32 weights against 20


def test_keeps_batch_dims_and_runs_compiled():
    weight = Sparse24Int4Weight(pruned(40, 64, seed=11))
    x = torch.randn(2, 3, 64)
    expected = F.linear(x, weight.dequantize())
    torch.testing.assert_close(weight.matmul(x), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(weight.matmul, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_detection_and_refusal():
    dense = pruned(16, 64, seed=12)
    assert is_two_of_four(dense)
    dense[3, 5] = 1.0 if dense[3, 5] == 0 else dense[3, 5]
    dense[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not is_two_of_four(dense)
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Int4Weight(dense)
    assert not is_two_of_four(torch.zeros(4, 40))  # 40 inputs: not whole groups of 32
