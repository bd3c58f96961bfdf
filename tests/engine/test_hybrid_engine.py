"""Hybrid models through the whole engine: state slots beside KV pages, continuous batching of
prefill and decode, preemption, and the hybrid prefix cache (checkpoints, copy-on-match)."""

from __future__ import annotations

import pytest
import torch
from model_harness import assert_no_leaks, reference_greedy, token_ids

from sluice import SamplingParams
from sluice.api import LLM
from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.engine.model_runner import kv_bytes_per_page, state_bytes_per_slot
from sluice.models.registry import load_model

PAGE = 4
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=["bamba", "qwen3_next"])
def hybrid(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = make_tiny_checkpoint(request.param, folder)
    return reference, load_model(folder, torch.device("cpu"), torch.float32)


@pytest.fixture
def make_llm(hybrid):
    """Engines over the module's model: 4-token pages, 16-token steps; no leaks afterwards."""
    engines: list[Engine] = []

    def make(**options) -> LLM:
        options = {"page_size": PAGE, "max_num_batched_tokens": 16, **options}
        config = EngineConfig.create(quantization="none", dtype="float32", **options)
        engines.append(Engine(config, loaded=hybrid[1]))
        return LLM.from_engine(engines[-1])

    yield make
    for engine in engines:
        assert_no_leaks(engine)


def random_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()


def test_batched_chunked_generation_matches_transformers(hybrid, make_llm):
    reference, _ = hybrid
    prompts = [random_tokens(n, seed=n) for n in (5, 23, 40, 1)]
    llm = make_llm()
    assert llm.engine.executor.compiled_step is None  # hybrids run eagerly
    got = token_ids(llm.generate(prompts, GREEDY))
    assert got == [reference_greedy(reference, p, GREEDY.max_tokens) for p in prompts]


def test_preemption_and_scarce_slots_change_no_token(make_llm):
    prompts = [random_tokens(n, seed=100 + n) for n in (9, 30, 17, 26, 3, 21)]
    alone = make_llm()
    expected = [token_ids(alone.generate(p, GREEDY))[0] for p in prompts]
    squeezed = make_llm(num_pages=14, num_state_slots=3)
    assert token_ids(squeezed.generate(prompts, GREEDY)) == expected
    assert squeezed.engine.scheduler.num_preemptions > 0


SYSTEM = random_tokens(37, seed=1)  # nine whole pages and one token


def ask(llm: LLM, prompt: list[int]) -> tuple[list[int], int]:
    (result,) = llm.generate(prompt, GREEDY)
    return result.outputs[0].token_ids, result.num_cached_tokens


def test_prefix_cache_hits_checkpoints_and_changes_no_token(make_llm):
    """Sequential shared-prefix requests (16-token chunks, 4-token pages). Each hit ends at the
    deepest checkpoint on its path: a chunk boundary of an earlier request, a branch point that
    a previous hit checkpointed, the last page of an earlier conversation."""
    first = SYSTEM + random_tokens(6, seed=2)  # 43 tokens: chunks end at 16, 32, 40, then 43
    second = SYSTEM + random_tokens(5, seed=3)
    third = SYSTEM + random_tokens(7, seed=4)
    follow_up_turn = random_tokens(3, seed=5)
    reference = make_llm(enable_prefix_cache=False)  # engines share the model: one at a time
    expected_first = ask(reference, first)[0]
    follow_up = first + expected_first + follow_up_turn  # 43 + 8 + 3 tokens
    expected = [ask(reference, p)[0] for p in (first, second, third, follow_up)]
    cached = make_llm()

    out_first, hit = ask(cached, first)
    assert hit == 0
    out_second, hit = ask(cached, second)
    assert hit == 32  # A's last chunk boundary within the 36 shared whole-page tokens
    out_third, hit = ask(cached, third)
    assert hit == 36  # the second request stopped its first chunk at the branch point
    out_follow_up, hit = ask(cached, follow_up)
    assert hit == 48  # the newest output checkpoint: first's state after 48 of its 50 tokens
    assert [out_first, out_second, out_third, out_follow_up] == expected


def test_a_hit_whose_checkpoint_was_evicted_falls_back_to_a_shorter_one(make_llm):
    prompt = SYSTEM + random_tokens(6, seed=6)
    expected = ask(make_llm(enable_prefix_cache=False), prompt)[0]
    llm = make_llm()
    ask(llm, SYSTEM + random_tokens(6, seed=2))
    ask(llm, SYSTEM + random_tokens(5, seed=3))  # checkpoints the branch point at 36
    cache = llm.engine.prefix_cache
    branch = cache.match(prompt).node
    assert branch.state_checkpoint is not None and cache.match(prompt).num_tokens == 36
    cache.drop_checkpoint(branch)  # as LRU eviction would: the node stays, a tombstone
    out, hit = ask(llm, prompt)
    assert hit == 32 and out == expected
    cache.check_integrity()


def test_concurrent_shared_prefix_requests_change_no_token(make_llm):
    prompts = [SYSTEM + random_tokens(n, seed=10 + n) for n in (2, 9, 4, 13)]
    expected = token_ids(make_llm(enable_prefix_cache=False).generate(prompts, GREEDY))
    llm = make_llm(num_state_slots=6)  # checkpoints compete with running requests for slots
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert token_ids(llm.generate(prompts[::-1], GREEDY)) == expected[::-1]


def test_the_cache_budget_splits_between_state_slots_and_pages(hybrid):
    loaded = hybrid[1]
    config = EngineConfig.create(
        quantization="none", dtype="float32", kv_cache_memory_gb=0.001, state_pool_ratio=0.25
    )
    engine = Engine(config, loaded=loaded)
    budget = int(0.001 * (1 << 30))
    slot_bytes = state_bytes_per_slot(loaded.model, torch.float32)
    assert engine.state_pool.num_slots == budget // 4 // slot_bytes
    page_bytes = kv_bytes_per_page(loaded.config, 16, torch.float16)  # the CPU's KV default
    assert (
        engine.pool.num_pages == (budget - engine.state_pool.num_slots * slot_bytes) // page_bytes
    )
