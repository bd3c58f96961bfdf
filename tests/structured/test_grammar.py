"""Grammar state and masks on the default model's tokenizer (xgrammar, compiled here)."""

from __future__ import annotations

import json

import pytest
import torch

from sluice.layers.sampler import Sampler, SamplingBatch
from sluice.sampling_params import InvalidParameterError, SamplingParams
from sluice.structured.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask
from sluice.structured.spec import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}},
    "required": ["n"],
    "additionalProperties": False,
}
SPEC = StructuredOutput("json_schema", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def compiler(smollm) -> GrammarCompiler:
    return GrammarCompiler(smollm, smollm.vocab_size)


def allowed(state, vocab_size: int) -> set[int]:
    bitmask = allocate_bitmask(1, vocab_size)
    state.fill_mask(bitmask, 0)
    logits = torch.zeros(1, vocab_size)
    apply_bitmask(logits, bitmask)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_mask_follows_tokens_and_rolls_back_drafts(compiler, smollm):
    vocab = smollm.vocab_size
    text = smollm.encode('{"n": 12}', add_special_tokens=False)
    state = compiler.matcher(SPEC)
    first = allowed(state, vocab)
    assert text[0] in first and smollm.encode("x", add_special_tokens=False)[0] not in first
    assert state.follow(text[:2])
    after_two = allowed(state, vocab)
    assert text[2] in after_two
    # Drafts the grammar refuses: follow says so, and a rollback forgets them.
    bad = smollm.encode("}}}", add_special_tokens=False)
    assert not state.follow(text[:2] + bad)
    state.rollback_to(2)
    assert allowed(state, vocab) == after_two
    assert state.follow(text)
    assert allowed(state, vocab) == set(smollm.eos_token_ids) & set(range(vocab))


def test_compiled_grammars_are_cached_and_bad_ones_named(compiler):
    assert compiler.compile(SPEC) is compiler.compile(
        StructuredOutput("json_schema", json.dumps(SCHEMA))
    )
    with pytest.raises(InvalidParameterError) as bad:
        compiler.compile(StructuredOutput("regex", "([a", param="guided_regex"))
    assert bad.value.param == "guided_regex"


def test_sampler_never_draws_a_masked_token_and_logprobs_stay_the_models(compiler, smollm):
    vocab = smollm.vocab_size
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    bitmask = allocate_bitmask(4, vocab)
    for row in range(3):  # the last row stays free
        compiler.matcher(SPEC).fill_mask(bitmask, row)
    params = [SamplingParams(temperature=2.0, seed=s, logprobs=1) for s in range(4)]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    state = compiler.matcher(SPEC)
    first = allowed(state, vocab)
    for _ in range(20):
        batch = SamplingBatch.build(
            params, generators, [[]] * 4, [[]] * 4, torch.device("cpu"), bitmask
        )
        out = Sampler()(logits, batch)
        assert all(t in first for t in out.token_ids[:3].tolist())
        torch.testing.assert_close(
            out.logprobs, logits.log_softmax(-1).gather(1, out.token_ids[:, None])[:, 0]
        )


def test_logit_bias_in_the_sampler():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0
    params = [SamplingParams(logit_bias={3: -100.0}), SamplingParams(logit_bias={7: 100.0})]
    batch = SamplingBatch.build(params, [None, None], [[]] * 2, [[]] * 2, torch.device("cpu"))
    assert Sampler()(logits, batch).token_ids.tolist()[1] == 7
    assert Sampler()(logits, batch).token_ids.tolist()[0] != 3
    with pytest.raises(InvalidParameterError):
        SamplingParams(logit_bias={3: 100.5})
