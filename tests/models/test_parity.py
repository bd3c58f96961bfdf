"""Our model code against transformers on tiny random checkpoints: same weights, same logits."""

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


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_tiny_checkpoint(request.param, folder)
    return reference, load_ours(folder)


def test_batched_prefill_matches_reference(checkpoint):
    reference, ours = checkpoint
    batch = prompts([5, 17, 33, 1])
    got = PagedRunner(ours, len(batch)).run(dict(enumerate(batch)))
    for i, ids in enumerate(batch):
        torch.testing.assert_close(got[i], reference_logits(reference, ids), atol=TOLERANCE, rtol=0)


def test_chunked_prefill_and_decode_match_reference(checkpoint):
    reference, ours = checkpoint
    batch = prompts([23, 9], seed=1)
    runner = PagedRunner(ours, len(batch))
    last = {}
    for start in range(0, 23, 7):  # chunks of 7, the short prompt finishing early
        chunks = {
            i: ids[start : start + 7] for i, ids in enumerate(batch) if ids[start : start + 7]
        }
        got = runner.run(chunks)
        for i, chunk in chunks.items():
            expected = reference_logits(reference, batch[i][: start + len(chunk)])[start:]
            torch.testing.assert_close(got[i], expected, atol=TOLERANCE, rtol=0)
            last[i] = got[i][-1]
    check_batched_greedy_decode(reference, runner, last, batch, 8, TOLERANCE)
