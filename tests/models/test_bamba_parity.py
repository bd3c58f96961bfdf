"""Bamba (Mamba2 + attention hybrid) against transformers on a tiny random checkpoint: same
weights, same logits, through batched prefill, chunked prefill and batched decode."""

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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bamba")
    reference = make_tiny_checkpoint("bamba", folder)
    return reference, load_ours(folder)


def test_batched_prefill_matches_reference(checkpoint):
    reference, ours = checkpoint
    batch = prompts([5, 17, 33, 1])  # not multiples of the chunk size (8); 1 runs as a decode
    got = PagedRunner(ours, len(batch)).run(dict(enumerate(batch)))
    for i, ids in enumerate(batch):
        torch.testing.assert_close(got[i], reference_logits(reference, ids), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("chunk", [7, 16, None], ids=["chunk7", "chunk16", "whole"])
def test_chunked_prefill_matches_one_forward(checkpoint, chunk):
    """Two prompts chunked side by side; some last chunks are a single token, which runs as a
    decode next to the other prompt's prefill chunk."""
    reference, ours = checkpoint
    batch = prompts([29, 33], seed=1)
    chunk = chunk or max(map(len, batch))
    runner = PagedRunner(ours, len(batch))
    pieces: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(batch))}
    for start in range(0, max(map(len, batch)), chunk):
        chunks = {i: ids[start : start + chunk] for i, ids in enumerate(batch) if ids[start:]}
        for i, logits in runner.run(chunks).items():
            pieces[i].append(logits)
    for i, ids in enumerate(batch):
        got = torch.cat(pieces[i])
        torch.testing.assert_close(got, reference_logits(reference, ids), atol=TOLERANCE, rtol=0)


def test_batched_greedy_decode_matches_reference(checkpoint):
    """32 greedy steps of two sequences decoded together; the reference is causal, so one forward
    over each final sequence gives its logits at every step."""
    reference, ours = checkpoint
    batch = prompts([11, 6], seed=2)
    runner = PagedRunner(ours, len(batch))
    last = {i: logits[-1] for i, logits in runner.run(dict(enumerate(batch))).items()}
    check_batched_greedy_decode(reference, runner, last, batch, 32, TOLERANCE)
