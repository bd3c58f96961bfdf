"""Our model code against transformers on tiny random checkpoints of every architecture we
claim (Llama with llama3 rope, Qwen3, Mistral; the hybrids Qwen3-Next, with Gated DeltaNet and
gated attention, and Bamba, with Mamba2): same weights, same logits, whether prompts run batched,
in chunks (carrying KV and recurrent state across steps) or as batched decodes."""

from __future__ import annotations

import pytest
import torch
from model_harness import (
    PagedRunner,
    check_batched_greedy_decode,
    load_ours,
    prompts,
    reference_logits,
)

from sluice.bench.tiny_checkpoint import make_tiny_checkpoint

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral", "qwen3_next", "bamba"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_tiny_checkpoint(request.param, folder)
    return reference, load_ours(folder)


def test_batched_prefill_matches_reference(checkpoint):
    reference, ours = checkpoint
    # Not multiples of either recurrent chunk size (Bamba's 8, DeltaNet's 64), one past 64, one
    # a decode.
    batch = prompts([5, 17, 33, 70, 1])
    got = PagedRunner(ours, len(batch)).run(dict(enumerate(batch)))
    for i, ids in enumerate(batch):
        torch.testing.assert_close(got[i], reference_logits(reference, ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("chunk", [7, 16, None], ids=["chunk7", "chunk16", "whole"])
def test_chunked_prefill_matches_one_forward(checkpoint, chunk):
    """Two prompts chunked side by side; with chunks of 7 the short one ends on a 1-token chunk,
    which runs as a decode next to the other prompt's prefill chunk."""
    reference, ours = checkpoint
    batch = prompts([70, 22], seed=1)
    expected = [reference_logits(reference, ids) for ids in batch]
    runner = PagedRunner(ours, len(batch))
    step = chunk or max(map(len, batch))
    for start in range(0, max(map(len, batch)), step):
        chunks = {i: ids[start : start + step] for i, ids in enumerate(batch)}
        got = runner.run({i: c for i, c in chunks.items() if c})
        for i, logits in got.items():
            torch.testing.assert_close(
                logits, expected[i][start : start + len(logits)], atol=TOLERANCE, rtol=0
            )


def test_batched_greedy_decode_matches_reference(checkpoint):
    reference, ours = checkpoint
    batch = prompts([40, 9], seed=2)
    runner = PagedRunner(ours, len(batch))
    last = {i: logits[-1] for i, logits in runner.run(dict(enumerate(batch))).items()}
    check_batched_greedy_decode(reference, runner, last, batch, 32, TOLERANCE)
