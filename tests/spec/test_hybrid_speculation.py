"""Speculative decoding on the hybrids (tiny random Qwen3-Next and Bamba checkpoints).

A verify run keeps the recurrent state after each of its tokens (in slots lent for the step)
and the update commits the one after the accepted drafts, so greedy and seeded outputs are the
same as without speculation, at every accepted length from none to all; state slots and pages
are exact after every step (preemption, stops inside an accepted run and aborts included); the
prefix cache's checkpoints taken during speculation give the same tokens on a hit.
"""

from __future__ import annotations

import pytest
import torch
from model_harness import recurrent_step, token_ids

from sluice import SamplingParams
from sluice.bench.replay_proposer import ReplayProposer
from sluice.bench.tiny_checkpoint import VOCAB_SIZE
from sluice.engine.engine import Engine
from sluice.engine.model_runner import allocate_state
from sluice.spec.stats import SpecStats
from tests.engine import test_hybrid_engine

pytestmark = pytest.mark.slow

hybrid = test_hybrid_engine.hybrid  # both hybrids, one module-scoped checkpoint each
make_llm = test_hybrid_engine.make_llm  # 4-token pages, 16-token steps, no leaks afterwards
random_tokens = test_hybrid_engine.random_tokens

K = 4
NGRAM = {
    "speculative_method": "ngram",
    "num_speculative_tokens": K,
    "speculative_disable_batch_size": 64,
    "speculative_draft_row_cost": 0,  # every draft proposed: the tests verify them
}


def greedy(max_tokens: int = 12, **settings) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **settings)


def mixed_prompts() -> list[list[int]]:
    """16 prompts of 1 to 51 tokens: random ones, and phrases repeated (n-gram drafts match)."""
    randoms = [random_tokens(1 + 7 * i, seed=200 + i) for i in range(8)]
    repeats = [random_tokens(2 + i % 4, seed=300 + i) * (2 + i) for i in range(8)]
    return [p for pair in zip(randoms, repeats) for p in pair]


def replaying(llm, prompts, outputs, wrong: bool = True):
    """The LLM, proposing the target's own continuation `outputs` (of a run without drafts),
    with one draft wrong at a cycling position unless not `wrong`."""
    llm.engine.proposer = ReplayProposer(prompts, outputs, VOCAB_SIZE, wrong)
    return llm


def accepted_lengths(stats: SpecStats) -> list[int]:
    """How many verify steps kept exactly 0, 1, ..., k drafts (of k proposed or fewer)."""
    kept_at_least = [stats.num_drafts, *stats.accepted_per_position, 0]
    return [kept_at_least[i] - kept_at_least[i + 1] for i in range(len(kept_at_least) - 1)]


def assert_slots_exact(engine: Engine) -> None:
    """Between steps every state slot is free, a running request's or a checkpoint's: none is
    still lent to a verify run, and none is held twice (the fixture checks the cache's own
    integrity at the end)."""
    running = engine.scheduler.running
    assert not any(r.verify_state_slots for r in running), "verify slots outlived their step"
    owned = [r.state_slot for r in running]
    assert None not in owned and len(set(owned)) == len(owned)
    cache = engine.prefix_cache
    checkpoints = cache.num_checkpoints if cache is not None else 0
    pool = engine.state_pool
    assert pool.num_free + len(owned) + checkpoints == pool.num_slots, "state slots leaked"


def checked_every_step(llm):
    """The LLM, its engine asserting its slots exact after each step."""
    engine, step = llm.engine, llm.engine.step

    def checked_step():
        outputs = step()
        assert_slots_exact(engine)
        return outputs

    engine.step = checked_step
    return llm


def test_a_verify_run_leaves_the_state_after_each_token(hybrid):
    """Each recurrent layer alone: a verify run of 4 tokens, in one step beside a decode and a
    prefill chunk, gives the outputs of 4 decodes one after the other and leaves the state after
    each of its tokens in its 3 verify slots and its own slot."""
    _, loaded = hybrid
    torch.manual_seed(0)
    cache = allocate_state(loaded.model, 9, torch.float32, torch.device("cpu"))
    for layer in loaded.model.state_layers():
        tensors = list(cache.layer(layer.state_index).values())
        x = torch.randn(13, loaded.config.hidden_size)
        recurrent_step(layer, cache, x[:5], [5], [0])  # a prefix in slot 0 ...
        for tensor in tensors:  # ... and in slot 8, for the reference's decodes
            tensor[8] = tensor[0]
        want_out, want_states = [], []
        for i in range(5, 9):
            want_out.append(recurrent_step(layer, cache, x[i : i + 1], [1], [8]))
            want_states.append([tensor[8].clone() for tensor in tensors])
        mixed = torch.cat((x[9:10], x[5:9], x[10:13]))  # a decode, the verify run, a prefill
        out = recurrent_step(layer, cache, mixed, [1, 4, 3], [4, 0, 5], [[], [1, 2, 3], []])
        torch.testing.assert_close(out[1:5], torch.cat(want_out), atol=1e-5, rtol=0)
        for slot, want in zip([1, 2, 3, 0], want_states):
            for tensor, expected in zip(tensors, want):
                torch.testing.assert_close(tensor[slot], expected, atol=1e-5, rtol=0)


def test_greedy_tokens_are_the_same_with_drafts_batched_chunked_and_preempted(make_llm):
    """16 mixed prompts batched: n-gram drafts, then drafts of the target's own continuation
    with one wrong at a cycling position (every accepted length, 0 to k, occurs), then those in
    7-token steps with pages and slots so scarce that requests are preempted and verify runs get
    fewer slots than drafts."""
    prompts = mixed_prompts()
    expected = token_ids(make_llm(enable_prefix_cache=False).generate(prompts, greedy()))

    ngram = checked_every_step(make_llm(**NGRAM))
    assert token_ids(ngram.generate(prompts, greedy())) == expected
    assert ngram.engine.scheduler.spec_stats.num_drafts > 0  # a random model: most rejected

    told = checked_every_step(replaying(make_llm(**NGRAM), prompts, expected))
    assert token_ids(told.generate(prompts, greedy())) == expected
    assert all(n > 0 for n in accepted_lengths(told.engine.scheduler.spec_stats))

    squeezed = make_llm(max_num_batched_tokens=7, num_pages=24, num_state_slots=10, **NGRAM)
    checked_every_step(replaying(squeezed, prompts, expected))
    assert token_ids(squeezed.generate(prompts, greedy())) == expected
    assert squeezed.engine.scheduler.num_preemptions > 0
    assert all(n > 0 for n in accepted_lengths(squeezed.engine.scheduler.spec_stats))


def test_seeded_samples_are_the_same_with_and_without_drafts_alone_or_batched(make_llm):
    """A seeded request draws output position i from its own (seed, i) generator: drafts of its
    own seeded continuation (some wrong) and n-gram drafts change none of its tokens."""
    prompts = mixed_prompts()[::2]
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    expected = token_ids(make_llm().generate(prompts, params))
    told = checked_every_step(replaying(make_llm(**NGRAM), prompts, expected))
    assert token_ids(told.generate(prompts, params)) == expected
    assert token_ids(told.generate(prompts[3], params[3])) == expected[3:4]
    assert all(n > 0 for n in accepted_lengths(told.engine.scheduler.spec_stats))
    ngram = checked_every_step(make_llm(**NGRAM))
    assert token_ids(ngram.generate(prompts, params)) == expected


def test_stops_inside_an_accepted_run_end_where_they_end_without_drafts(make_llm):
    """A stop token id, a stop string and max_tokens, each inside a run of accepted drafts: the
    same tokens, text and finish reason as without speculation; a follow-up turn then hits the
    cache (no checkpoint of a state past a stop was kept) and gives the same tokens."""
    prompt = mixed_prompts()[5]
    plain = make_llm(enable_prefix_cache=False)
    full = plain.generate([prompt], greedy(16))[0].outputs[0]
    cases = [
        SamplingParams(max_tokens=16, stop_token_ids=[full.token_ids[9]]),
        SamplingParams(max_tokens=16, stop=[full.text[-14:-8]]),
        greedy(7),
    ]
    told = checked_every_step(replaying(make_llm(**NGRAM), [prompt], [full.token_ids], wrong=False))
    for params in cases:
        want = plain.generate([prompt], params)[0].outputs[0]
        got = told.generate([prompt], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
        follow_up = prompt + want.token_ids + random_tokens(3, seed=7)
        want_next = token_ids(plain.generate([follow_up], greedy(4)))
        assert token_ids(told.generate([follow_up], greedy(4, speculative=False))) == want_next
    assert told.engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_a_checkpoint_taken_inside_an_accepted_run_serves_the_next_turn(make_llm):
    """A 42-token prompt, 8 tokens out with all drafts kept: the runs cover tokens 42-46 and
    47-48, each passing a page boundary (44, 48) before its end. The state after 48 tokens is
    checkpointed from the run's slot for it, so the next turn hits 48 tokens, as without
    speculation, and gives the same tokens."""
    prompt = random_tokens(42, seed=8)
    plain = make_llm()
    (first,) = token_ids(plain.generate([prompt], greedy(8)))
    follow_up = prompt + first + random_tokens(3, seed=9)
    (want,) = plain.generate([follow_up], greedy(8))

    outputs = [first, want.outputs[0].token_ids]
    told = replaying(make_llm(**NGRAM), [prompt, follow_up], outputs, wrong=False)
    assert token_ids(told.generate([prompt], greedy(8))) == [first]
    assert accepted_lengths(told.engine.scheduler.spec_stats) == [0, 1, 0, 0, 1]
    (got,) = told.generate([follow_up], greedy(8))
    assert got.num_cached_tokens == want.num_cached_tokens == 48
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_aborts_and_rejections_leave_every_slot_and_page_free(make_llm):
    """Requests aborted right after a verify step (drafts kept and rejected), the others run to
    the end: slots exact after every step; the fixture checks that all is free at the end."""
    prompts = mixed_prompts()[:6]
    expected = token_ids(make_llm().generate(prompts, greedy(16)))
    engine = checked_every_step(replaying(make_llm(**NGRAM), prompts, expected)).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), engine.prepare(prompt, greedy(16)))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        for request_id in ("1", "4"):
            if len(outputs[request_id]) >= 5:
                engine.abort_request(request_id)
                assert_slots_exact(engine)
    assert engine.scheduler.spec_stats.num_accepted_tokens > 0
    kept = [i for i in range(len(prompts)) if i not in (1, 4)]
    assert [outputs[str(i)] for i in kept] == [expected[i] for i in kept]
    assert all(0 < len(outputs[r]) < 16 for r in ("1", "4"))
