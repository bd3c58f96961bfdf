"""Speculative decoding on the real default model: the same tokens as without it (greedy and
seeded), stops that land inside a run of accepted drafts, and pages exact afterwards."""

from __future__ import annotations

import pytest
from model_harness import token_ids

from sluice import SamplingParams
from sluice.spec.stats import SpecStats
from tests.conftest import assert_no_leaks
from tests.engine.test_engine import assert_parts_only_at_a_near_tie, mixed_prompts

pytestmark = pytest.mark.slow

FP32 = {"kv_cache_dtype": "float32", "compile": False}
# Every request proposes the full k (no cost-based policy): the exactness tests verify drafts.
NGRAM = {
    "speculative_method": "ngram",
    "speculative_disable_batch_size": 64,
    "speculative_draft_row_cost": 0,
}
# The target's own weights as its draft: the fp32 model itself, or its GGUF's Q4_1 blocks.
SELF_DRAFT = {
    "speculative_method": "draft",
    "draft_model": "self",
    "draft_quantization": "none",
    "speculative_draft_row_cost": 0,
}
INT4_SELF_DRAFT = {**SELF_DRAFT, "draft_quantization": "auto"}
CODE = (
    "def area(width, height):\n    return width * height\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n"
)


def code_prompt(llm) -> list[int]:
    message = f"Repeat this code exactly, then say done:\n{CODE}"
    return llm.chat_prompt([{"role": "user", "content": message}])


def greedy(max_tokens: int = 24, **settings) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **settings)


def accepted_runs(stats: SpecStats) -> int:
    """Verify steps that kept at least two drafts."""
    return stats.accepted_per_position[1] if len(stats.accepted_per_position) > 1 else 0


def test_greedy_batched_chunked_and_preempted_gives_the_same_tokens(make_llm):
    """16 mixed prompts (half of them a story that repeats itself, so drafts are accepted),
    batched, then in 7-token chunks with a pool so small that requests are preempted; n-gram
    drafts, then suffix-decoding ones."""
    plain = make_llm(**FP32)
    prompts = mixed_prompts(plain)
    expected = token_ids(plain.generate(prompts, greedy()))

    spec = make_llm(**FP32, **NGRAM)
    assert token_ids(spec.generate(prompts, greedy())) == expected
    assert accepted_runs(spec.engine.scheduler.spec_stats) > 0

    squeezed = make_llm(
        max_num_batched_tokens=7, num_pages=12, enable_prefix_cache=False, **FP32, **NGRAM
    )
    assert token_ids(squeezed.generate(prompts, greedy())) == expected
    assert squeezed.engine.scheduler.num_preemptions > 0
    assert squeezed.engine.scheduler.spec_stats.num_accepted_tokens > 0

    # Suffix decoding: the second time round, the global tree holds the first round's outputs.
    suffix = make_llm(**FP32, **{**NGRAM, "speculative_method": "suffix"})
    assert token_ids(suffix.generate(prompts, greedy())) == expected
    assert token_ids(suffix.generate(prompts, greedy())) == expected
    assert accepted_runs(suffix.engine.scheduler.spec_stats) > 0

    # The model drafting for itself (one copy of the weights, two caches): every draft kept.
    itself = make_llm(**FP32, **{**NGRAM, **SELF_DRAFT})
    assert itself.engine.proposer.runner.model is itself.engine.executor.model
    assert token_ids(itself.generate(prompts, greedy())) == expected
    assert itself.engine.scheduler.spec_stats.acceptance_rate == 1.0


def test_the_default_models_q4_weights_draft_for_its_fp32_ones(make_llm):
    """The fp32 (dequantized) default model with its own GGUF's 4-bit blocks as the draft: the
    same tokens, and most drafts accepted."""
    plain = make_llm(**FP32)
    prompts = [code_prompt(plain), *mixed_prompts(plain)[2:8:3]]
    expected = token_ids(plain.generate(prompts, greedy(32)))
    spec = make_llm(**FP32, **{**NGRAM, **INT4_SELF_DRAFT})
    assert token_ids(spec.generate(prompts, greedy(32))) == expected
    assert spec.engine.scheduler.spec_stats.acceptance_rate > 0.7


def test_compiled_steps_verify_drafts_too(make_llm):
    """Verify steps (1 + k query rows per request) run through the compiled decode graph, a row
    per token; over float16 pages a continuation may part from the plain compiled run only at a near-tie."""
    plain = make_llm()
    prompts = [code_prompt(plain), *mixed_prompts(plain)[1:8:2]]
    params = greedy(40, logprobs=2)
    expected = [r.outputs[0] for r in plain.generate(prompts, params)]
    spec = make_llm(**NGRAM)
    assert spec.engine.executor.compiled_step is not None
    got = token_ids(spec.generate(prompts, params))
    assert sum(assert_parts_only_at_a_near_tie(w, g) for w, g in zip(expected, got)) <= 1
    assert accepted_runs(spec.engine.scheduler.spec_stats) > 0


def test_stops_inside_an_accepted_run_end_the_output_at_their_token(make_llm):
    """A stop string, a stop token id and max_tokens each placed in the middle of the copied
    code (where drafts are accepted several at a time) end the output exactly where they end it
    without speculation: same tokens, text, finish reason and usage."""
    plain, spec = make_llm(**FP32), make_llm(**FP32, **NGRAM)
    prompt = code_prompt(plain)
    full = plain.generate([prompt], greedy(48))[0].outputs[0]
    middle = full.token_ids[30]
    cases = [
        SamplingParams(max_tokens=48, stop=[full.text[70:74]]),
        SamplingParams(max_tokens=48, stop_token_ids=[middle]),
        SamplingParams(max_tokens=29, ignore_eos=True),
        SamplingParams(max_tokens=48, stop=[full.text[70:74]], logprobs=1),
    ]
    for params in cases:
        want = plain.generate([prompt], params)[0]
        got = spec.generate([prompt], params)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, params
        assert got.outputs[0].text == want.outputs[0].text
        assert got.outputs[0].finish_reason == want.outputs[0].finish_reason
        assert len(got.outputs[0].logprobs) == len(want.outputs[0].logprobs)
    stats = spec.engine.scheduler.spec_stats
    assert accepted_runs(stats) > 0
    assert_no_leaks(spec.engine)


def test_seeded_samples_are_the_same_with_and_without_drafts_alone_or_batched(make_llm):
    """A seeded request draws each output position from its own (seed, position) generator, so
    its tokens do not depend on the batch nor on whether drafts were checked; every setting
    (temperature, top-k/p, min-p, penalties with the history up to each row, min_tokens,
    logprobs, n) applies per verify row as in a plain decode."""
    plain, spec = make_llm(**FP32), make_llm(**FP32, **NGRAM)
    prompt = code_prompt(plain)
    params = SamplingParams(
        max_tokens=24,
        temperature=0.7,
        top_k=40,
        top_p=0.95,
        min_p=0.02,
        repetition_penalty=1.05,
        frequency_penalty=0.1,
        min_tokens=20,
        seed=11,
        n=2,
        logprobs=1,
    )
    want = plain.generate([prompt], params)[0].outputs
    alone = spec.generate([prompt], params)[0].outputs
    noise = SamplingParams(max_tokens=16, temperature=1.0)
    batched = spec.generate([prompt, "Hello there", prompt], [noise, noise, params])[2].outputs
    for got in (alone, batched):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.text for c in got] == [c.text for c in want]
        for w, g in zip(want[0].logprobs, got[0].logprobs):
            assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=1e-3)
    assert spec.engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_a_request_may_opt_out_and_aborts_free_everything(make_llm):
    spec = make_llm(**FP32, **NGRAM)
    prompt = code_prompt(spec)
    spec.generate([prompt], greedy(20, speculative=False))
    assert spec.engine.scheduler.spec_stats.num_drafts == 0

    engine = spec.engine
    engine.add_request("cut", engine.prepare(prompt, greedy(100)))
    while engine.scheduler.spec_stats.num_accepted_tokens == 0:
        engine.step()
    engine.abort_request("cut")
    assert not engine.proposer._indexes  # the proposer forgot the aborted request
    assert_no_leaks(engine)


def test_the_cost_policy_drafts_only_what_pays_and_keeps_the_tokens(make_llm):
    """Open-ended chat, whose n-gram drafts are mostly rejected: with the cost-based policy
    each request proposes far fewer drafts than when every step drafts k, with the same tokens;
    code to repeat still gets runs of drafts accepted."""
    full = make_llm(**FP32, **NGRAM)
    costed = make_llm(**FP32, **{**NGRAM, "speculative_draft_row_cost": 0.25})
    chat = full.chat_prompt([{"role": "user", "content": "What makes a good friend?"}])
    want = token_ids(full.generate([chat], greedy(64)))
    assert token_ids(costed.generate([chat], greedy(64))) == want
    drafted = full.engine.scheduler.spec_stats.num_draft_tokens
    assert costed.engine.scheduler.spec_stats.num_draft_tokens < drafted / 2
    before = costed.engine.scheduler.spec_stats.snapshot()
    costed.generate([code_prompt(costed)], greedy(48))
    assert accepted_runs(costed.engine.scheduler.spec_stats.since(before)) > 0
