"""Prefix caching changes no token: cache on against cache off, in every sharing pattern."""

from __future__ import annotations

import pytest
from model_harness import token_ids

from sluice import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def shared_prefix_prompts(llm) -> list[list[int]]:
    system = llm.tokenizer.encode("You are a careful assistant who answers in one line. " * 6)
    question = llm.tokenizer.encode(" What is the tallest mountain on Earth?")
    base = system + question
    diverge_mid_page = base[:37] + llm.tokenizer.encode(" Completely different ending here.")
    return [
        base,
        base,  # identical
        base[:50],  # a prefix of another
        base + llm.tokenizer.encode(" And the deepest lake?"),  # extends another
        diverge_mid_page,  # shares 37 tokens: two whole pages and part of a third
        system + llm.tokenizer.encode(" Name a prime number."),
    ]


@pytest.fixture
def expected(make_llm):
    reference = make_llm(enable_prefix_cache=False)
    prompts = shared_prefix_prompts(reference)
    return prompts, token_ids(reference.generate(prompts, GREEDY))


def test_sequential_hits_give_the_same_tokens(make_llm, expected):
    prompts, want = expected
    llm = make_llm()
    got = [token_ids(llm.generate([p], GREEDY))[0] for p in prompts]
    assert got == want
    # The second identical prompt and the extension reuse the first prompt's pages.
    again = llm.generate([prompts[0]], GREEDY)[0]
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 16 * 16
    llm.engine.prefix_cache.check_integrity()


def test_concurrent_arrivals_share_pages_and_give_the_same_tokens(make_llm, expected):
    prompts, want = expected
    llm = make_llm(max_num_batched_tokens=24)  # small chunks: later arrivals hit earlier chunks
    assert token_ids(llm.generate(prompts, GREEDY)) == want


def test_mid_page_divergence_matches_whole_pages_only(make_llm, expected):
    prompts, want = expected
    llm = make_llm()
    llm.generate([prompts[0]], GREEDY)
    result = llm.generate([prompts[4]], GREEDY)[0]
    assert result.num_cached_tokens == 32  # 37 shared tokens: two whole pages
    assert result.outputs[0].token_ids == want[4]


def test_cache_salt_isolates_namespaces(make_llm, expected):
    prompts, _ = expected
    llm = make_llm()
    engine = llm.engine
    engine.add_request("a", engine.prepare(prompts[0], GREEDY, cache_salt="alice"))
    engine.add_request("b", engine.prepare(prompts[0], GREEDY, cache_salt="bob"))
    cached = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
    assert cached == {"a": 0, "b": 0}
    engine.add_request("c", engine.prepare(prompts[0], GREEDY, cache_salt="alice"))
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
    assert cached["c"] > 0


def test_eviction_heavy_run_leaks_nothing_and_changes_nothing(make_llm, expected):
    prompts, want = expected
    llm = make_llm(num_pages=24)  # far fewer pages than the distinct prefixes need
    for _ in range(3):
        assert token_ids(llm.generate(prompts, GREEDY)) == want
        llm.engine.prefix_cache.check_integrity()
