"""The engine on the real default model: batching, chunking, preemption and the compiled step
change nothing."""

from __future__ import annotations

import pytest
import torch
from model_harness import token_ids

from sluice import InvalidParameterError, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a five year old.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Give me a recipe for pancakes.",
]


def mixed_prompts(llm) -> list[list[int]]:
    """16 prompts of mixed lengths: chat prompts and raw text, 10 to ~250 tokens."""
    chats = [llm.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    story = "Once upon a time, in a land of rivers and mills, there lived a miller. " * 12
    raws = [llm.tokenizer.encode(story[: 40 * (i + 1)]) for i in range(8)]
    return [p for pair in zip(chats, raws) for p in pair]


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def test_batch_chunking_and_preemption_change_nothing(make_llm):
    """Over fp32 pages: over float16 ones, one of the 16 prompts parted after 10 tokens batched
    against alone (keys that differ by fp32 rounding between batch shapes can round to different
    halves, and a near-tie flips). Eagerly, since the shared model's graphs are compiled for the
    default float16 pools (the compiled step has tests of its own)."""
    fp32 = {"kv_cache_dtype": "float32", "compile": False}
    alone = make_llm(**fp32)
    prompts = mixed_prompts(alone)
    expected = [token_ids(alone.generate([p], greedy()))[0] for p in prompts]

    together = make_llm(**fp32)
    assert token_ids(together.generate(prompts, greedy())) == expected

    # 7-token chunks and a pool far smaller than the 16 requests need: preemption must happen.
    squeezed = make_llm(max_num_batched_tokens=7, num_pages=12, enable_prefix_cache=False, **fp32)
    assert token_ids(squeezed.generate(prompts, greedy())) == expected
    assert squeezed.engine.scheduler.num_preemptions > 0


def test_float16_kv_cache_keeps_greedy_output(make_llm):
    """Pages of half the bytes for the fp32 model (the CPU's default): greedy continuations of 8
    chat prompts, batched (48 tokens each), follow those over an fp32 cache, through the compiled
    graphs (the decode graph widens keys and values as it reads them) and eagerly. A continuation
    may part only where the fp32 run's two best tokens were within 0.01 of each other in
    log-probability, and to the second of them: "List three prime numbers." parts after 10
    tokens ("\n" at -1.0340 against "3" at -1.0368), one of the 16 continuations."""
    reference = make_llm(kv_cache_dtype="float32", compile=False)
    assert reference.engine.executor.kv_cache.dtype == torch.float32
    prompts = [reference.chat_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=48, ignore_eos=True, logprobs=2)
    expected = [r.outputs[0] for r in reference.generate(prompts, params)]
    parted = 0
    for compile in (True, False):
        half = make_llm(compile=compile)
        assert half.engine.executor.kv_cache.dtype == torch.float16
        for want, got in zip(expected, token_ids(half.generate(prompts, params))):
            parted += assert_parts_only_at_a_near_tie(want, got)
    assert parted <= 2


def test_engine_output_is_the_same_compiled_or_eager(make_llm):
    """Greedy continuations of prompts of different lengths, batched (steps of prefill chunks,
    decodes and both; 16-token chunks), equal the all-eager engine's."""
    eager = make_llm(compile=False, max_num_batched_tokens=16)
    compiled = make_llm(max_num_batched_tokens=16)
    assert eager.engine.executor.compiled_step is None
    assert compiled.engine.executor.compiled_step is not None
    prompts = [
        eager.chat_prompt([{"role": "user", "content": q}])
        for q in ("Why is the sky blue?", "Name a prime number.", "Write a haiku about rain.")
    ] + ["Once upon a time", "The quick brown fox"]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (24, 9, 17, 30, 3)]
    expected = [r.outputs[0].token_ids for r in eager.generate(prompts, params)]
    got = [r.outputs[0].token_ids for r in compiled.generate(prompts, params)]
    assert got == expected
    assert [len(ids) for ids in got] == [24, 9, 17, 30, 3]


def assert_parts_only_at_a_near_tie(want, got: list[int]) -> bool:
    """Whether `got` parts from `want` (an output with logprobs=2), which it may do only where
    `want`'s runner-up was within 0.01 of its choice and `got` took that runner-up."""
    for i, (a, b) in enumerate(zip(want.token_ids, got)):
        if a != b:
            (first, first_lp), (second, second_lp) = want.logprobs[i].top[:2]
            assert (first, second) == (a, b) and first_lp - second_lp < 0.01, (i, want.logprobs[i])
            return True
    return False


def test_seeded_sampling_ignores_the_rest_of_the_batch(make_llm):
    llm = make_llm()
    prompt = llm.chat_prompt([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = token_ids(llm.generate([prompt], params))[0]
    noise = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    crowd = llm.generate([prompt, "Hello there", prompt], [noise, noise, params])
    assert token_ids(crowd)[2] == alone
    assert token_ids(llm.generate([prompt], params))[0] == alone


def test_n_samples_get_distinct_seeds(make_llm):
    llm = make_llm()
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3, ignore_eos=True)
    (result,) = llm.generate(["The weather today is"], params)
    assert [c.index for c in result.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in result.outputs}) > 1
    again = llm.generate(
        ["The weather today is"], SamplingParams(**{**params.__dict__, "n": 1, "seed": 8})
    )
    assert again[0].outputs[0].token_ids == result.outputs[1].token_ids


def test_stop_string_is_cut_and_not_emitted(make_llm):
    llm = make_llm()
    prompt = llm.chat_prompt(
        [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    )
    full = llm.generate([prompt], greedy(30))[0].outputs[0].text
    stop = full[8:11]  # three characters from the middle, likely spanning a token boundary
    cut = llm.generate([prompt], SamplingParams(max_tokens=30, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    streamed = "".join(
        o.new_text for o in llm.stream(prompt, SamplingParams(max_tokens=30, stop=[stop]))
    )
    assert streamed == cut.text


def test_finish_reasons_and_eos(make_llm):
    llm = make_llm()
    prompt = llm.chat_prompt([{"role": "user", "content": "Say hi."}])
    short = llm.generate([prompt], SamplingParams(max_tokens=3))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    full = llm.generate([prompt], SamplingParams(max_tokens=200))[0].outputs[0]
    assert full.finish_reason == "stop" and full.token_ids[-1] in llm.tokenizer.eos_token_ids
    stop_id = full.token_ids[1]
    by_id = llm.generate([prompt], SamplingParams(max_tokens=200, stop_token_ids=[stop_id]))[
        0
    ].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:2]
    n = len(full.token_ids)
    held = llm.generate([prompt], SamplingParams(max_tokens=n + 5, min_tokens=n + 2))[0].outputs[0]
    assert len(held.token_ids) >= n + 2  # EOS was masked, not just ignored
    assert not set(held.token_ids[: n + 1]) & llm.tokenizer.eos_token_ids


def test_logprobs_of_chosen_token_and_alternatives(make_llm):
    llm = make_llm()
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, logprobs=3))[
        0
    ].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token_id and len(lp.top) == 3
        assert lp.top[0][0] == token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_streaming_utf8_has_no_replacement_characters(make_llm):
    llm = make_llm()
    prompt = llm.chat_prompt(
        [{"role": "user", "content": "Write five emoji and the Japanese word for cat."}]
    )
    outputs = list(llm.stream(prompt, SamplingParams(max_tokens=40)))
    # Only the final flush may hold U+FFFD: when max_tokens cuts a character in half.
    assert all("\ufffd" not in o.new_text for o in outputs if not o.finished)
    full = llm.generate([prompt], SamplingParams(max_tokens=40))[0].outputs[0]
    assert "".join(o.new_text for o in outputs) == full.text
    assert full.text == llm.tokenizer.decode(full.token_ids)


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ("hello " * 9000, {}, "prompt"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_input_is_refused_and_the_engine_keeps_serving(make_llm, prompt, params, param):
    llm = make_llm()
    with pytest.raises(InvalidParameterError) as err:
        llm.generate([prompt], SamplingParams(**params))
    assert err.value.param == param
    assert param.split("_")[0] in str(err.value)
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_prompt_longer_than_context_names_both_lengths(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(
        InvalidParameterError, match=r"prompt has \d+ tokens but the context window is 64"
    ):
        llm.generate(["word " * 100])


def test_generation_stops_at_the_context_window(make_llm):
    llm = make_llm(max_model_len=40)
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length"
    assert out.num_prompt_tokens + len(out.outputs[0].token_ids) == 40
