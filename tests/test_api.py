"""The `LLM` API as a careless user drives it: each call is atomic, streams are independent,
bad arguments are named."""

from __future__ import annotations

import pytest
from model_harness import token_ids

from sluice import InvalidParameterError, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def test_a_failed_generate_queues_nothing_and_the_llm_answers_next(make_llm):
    llm = make_llm()
    expected = token_ids(llm.generate(["hello"], GREEDY))
    with pytest.raises(InvalidParameterError) as err:
        llm.generate(["hello", [-1]], GREEDY)
    assert err.value.param == "prompt"
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.num_used == llm.engine.prefix_cache.num_cached_pages  # none held
    assert token_ids(llm.generate(["hello"], GREEDY)) == expected
    assert token_ids(llm.generate(["hello", "hello"], GREEDY)) == expected * 2


def test_interleaved_streams_each_get_exactly_their_tokens(make_llm):
    llm = make_llm()
    first = SamplingParams(max_tokens=10, ignore_eos=True)
    second = SamplingParams(max_tokens=3, ignore_eos=True)
    expected_a = token_ids(llm.generate(["first"], first))[0]
    expected_b = token_ids(llm.generate(["second"], second))[0]
    a, b = llm.stream("first", first), llm.stream("second", second)
    got_a, got_b = next(a).new_token_ids, next(b).new_token_ids
    got_a += [t for out in a for t in out.new_token_ids]
    got_b += [t for out in b for t in out.new_token_ids]
    assert (got_a, got_b) == (expected_a, expected_b)
    assert len(got_a) == 10 and len(got_b) == 3


def test_a_stream_left_open_is_aborted_when_closed_and_generate_runs_beside_it(make_llm):
    llm = make_llm()
    expected = token_ids(llm.generate(["hello"], GREEDY))
    stream = llm.stream("a long story", SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert token_ids(llm.generate(["hello"], GREEDY)) == expected  # steps the stream too
    stream.close()
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("call", "param", "message"),
    [
        (lambda llm: llm.chat([]), "messages", "at least one message"),
        (lambda llm: llm.chat([[]]), "messages", "at least one message"),
        (lambda llm: llm.generate([1.5]), "prompt", "got float"),
        (lambda llm: llm.generate([[1, 2.5]]), "prompt", "integers"),
        (lambda llm: llm.generate(b"bytes"), "prompt", "not bytes"),
        (
            lambda llm: llm.generate("hi", SamplingParams(stop_token_ids=[10**9])),
            "stop_token_ids",
            "[0, 49152)",
        ),
        (lambda llm: llm.generate(["a", "b"], [GREEDY]), "params", "1 SamplingParams"),
    ],
)
def test_bad_arguments_are_named(make_llm, call, param, message):
    llm = make_llm()
    with pytest.raises(InvalidParameterError) as err:
        call(llm)
    assert err.value.param == param
    assert message in str(err.value)
    assert not llm.engine.has_unfinished_requests()
