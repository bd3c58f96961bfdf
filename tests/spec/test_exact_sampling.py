"""Speculation changes no distribution: sampled requests whose drafts are verified draw their
tokens from the target model's exact distribution (a tiny random model with 8 tokens)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from tests.conftest import assert_no_leaks

pytestmark = pytest.mark.slow

VOCAB = 8
PROMPT = list(range(VOCAB)) * 3  # every token occurs: any first token finds an n-gram to follow
NUM_SAMPLES = 2000
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny8")
    reference = make_tiny_checkpoint("llama", folder, vocab_size=VOCAB)
    return folder, reference


def exact_joint(reference, prompt: list[int], length: int) -> torch.Tensor:
    """P(first `length` tokens) for every sequence of them, from transformers' logits."""
    sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=length)))
    ids = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences], dim=1)
    with torch.no_grad():
        logprobs = reference(ids).logits.double().log_softmax(-1)
    start = len(prompt) - 1
    steps = logprobs[:, start : start + length].gather(2, sequences.unsqueeze(2)).squeeze(2)
    return steps.sum(1).exp()


def chi_square_p_value(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, cells expected below 5 times pooled into one."""
    expected = probs * observed.sum()
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(degrees, statistic / 2).item()


def test_drafts_verified_by_rejection_leave_the_distribution_exact(tiny):
    """n-gram drafts (a one-hot proposal, far from the model's own distribution) for 2000
    unseeded samples, 64 at a time: the joint distribution of their first three tokens is the
    target's, and most samples had drafts checked (so the verify rows were exercised)."""
    folder, reference = tiny
    llm = LLM(
        str(folder),
        compile=False,
        speculative_method="ngram",
        num_speculative_tokens=3,
        speculative_disable_batch_size=1000,
        speculative_draft_row_cost=0,  # every request drafts, whatever its batch
    )
    torch.manual_seed(0)
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    results = llm.generate([PROMPT] * NUM_SAMPLES, params)
    firsts = torch.tensor([r.outputs[0].token_ids[:3] for r in results])
    observed = torch.bincount(firsts @ torch.tensor([VOCAB**2, VOCAB, 1]), minlength=VOCAB**3)
    assert chi_square_p_value(observed.double(), exact_joint(reference, PROMPT, 3)) > SIGNIFICANCE
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_drafts >= NUM_SAMPLES  # every sample had its second step's drafts checked
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leaks(llm.engine)
