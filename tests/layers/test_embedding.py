"""A Q8_0 table kept in its blocks gives exactly the dense fp32 dequantization: every row looked
up and every rescored logit, eager and compiled."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sluice.kernels import topk_cpu
from sluice.layers.embedding import Embedding
from sluice.layers.linear import Linear
from sluice.layers.logits import shortlisted_logits
from sluice.loaders.weights import GGUFQuantTensor

QType = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def token_table(default_gguf: Path) -> GGUFQuantTensor:
    """The default model's tied token_embd.weight, as the GGUF loader hands it over."""
    (tensor,) = (t for t in gguf.GGUFReader(default_gguf).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == QType.Q8_0
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    return GGUFQuantTensor(QType.Q8_0, np.asarray(tensor.data).reshape(rows, -1), (rows, cols))


def table(source: GGUFQuantTensor, keep_q8_0: bool) -> Embedding:
    embedding = Embedding(*source.shape)
    embedding.load(source, torch.float32, keep_q8_0)
    return embedding


def test_q8_0_rows_equal_the_dense_table(token_table: GGUFQuantTensor) -> None:
    quantized, dense = table(token_table, True), table(token_table, False)
    assert quantized.weight is None and quantized.values.dtype == torch.int8
    ids = torch.arange(token_table.shape[0])
    assert torch.equal(quantized(ids), dense.weight)
    assert torch.equal(
        dense.weight, torch.from_numpy(gguf.quants.dequantize(token_table.blocks, QType.Q8_0))
    )


def test_rescored_logits_equal_the_dense_head(token_table: GGUFQuantTensor) -> None:
    ranking = Linear(token_table.shape[1], token_table.shape[0])
    ranking.load(token_table, torch.float32, "auto")
    hidden = torch.randn(6, token_table.shape[1], generator=torch.Generator().manual_seed(0)) * 3
    dense, quantized = table(token_table, False), table(token_table, True)
    # Each selection against itself: where the ranking logits are bf16 (torch's int4pack, on
    # CPUs without AVX512-VNNI) ties at the 256th place are common, and the two selections may
    # break them differently (tests/kernels/test_topk_cpu.py compares the selections).
    for native_top_k in {False, topk_cpu.available()}:
        want = shortlisted_logits(hidden, ranking, dense, native_top_k)
        got = shortlisted_logits(hidden, ranking, quantized, native_top_k)
        assert torch.equal(got, want)


def test_compiled_lookup_equals_eager(token_table: GGUFQuantTensor) -> None:
    quantized = table(token_table, True)
    compiled = torch.compile(quantized.rows, fullgraph=True, dynamic=True)
    for ids in (torch.tensor([0, 5, 49151]), torch.randint(0, token_table.shape[0], (4, 64))):
        assert torch.equal(compiled(ids), quantized.rows(ids))


def test_other_tables_stay_dense() -> None:
    dense = torch.randn(64, 32)
    embedding = Embedding(64, 32)
    embedding.load(dense, torch.bfloat16, keep_q8_0=True)
    assert embedding.values is None
    assert torch.equal(embedding(torch.tensor([3, 7])), dense[[3, 7]].bfloat16())
