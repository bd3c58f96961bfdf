"""Scheduler and page pool on their own: no model, no torch."""

from __future__ import annotations

import random

import pytest

from sluice.config import SchedulerConfig
from sluice.engine.cache_manager import KVCacheManager, OutOfPagesError, PagePool
from sluice.engine.prefix_cache import PrefixCache
from sluice.engine.request import FinishReason, Request, RequestStatus
from sluice.engine.scheduler import Scheduler
from sluice.engine.step import SampledToken, StepOutput
from sluice.sampling_params import SamplingParams

EOS = 99


def make_request(
    name: str, prompt_len: int, max_tokens: int = 1000, prompt: list[int] | None = None
) -> Request:
    prompt = prompt if prompt is not None else list(range(prompt_len))
    return Request(name, prompt, SamplingParams(max_tokens=max_tokens), max_total_tokens=10_000)


def make_scheduler(
    num_pages: int,
    page_size: int = 4,
    budget: int = 16,
    max_seqs: int = 8,
    prefix_cache: bool = False,
) -> Scheduler:
    pool = PagePool(num_pages)
    cache = PrefixCache(pool, page_size) if prefix_cache else None
    kv = KVCacheManager(pool, page_size, cache)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(config, kv, frozenset({EOS}))


def run_step(scheduler: Scheduler, token: int = 0) -> dict[str, int]:
    """Schedule, pretend the model ran and sampled `token` on every sample row, and apply it
    with the scheduler's own update."""
    batch = scheduler.schedule()
    sampled = {
        r.request_id: [SampledToken(token, None)] * r.num_sample_rows
        for r in batch.step.requests
        if r.sampling is not None
    }
    scheduler.update(batch, StepOutput(sampled))
    return {r.request_id: n for r, n in zip(batch.requests, batch.num_tokens)}


def test_page_pool_refcounts_and_exhaustion():
    pool = PagePool(3)
    pages = pool.allocate(2)
    assert pages == [0, 1] and pool.num_free == 1
    pool.retain([0])
    pool.release([0, 1])
    assert pool.ref_count(0) == 1 and pool.num_free == 2
    with pytest.raises(OutOfPagesError):
        pool.allocate(3)
    pool.release([0])
    assert pool.num_free == 3


def test_chunked_prefill_follows_the_token_budget():
    scheduler = make_scheduler(num_pages=64, budget=7)
    scheduler.add(make_request("a", 20))
    assert [run_step(scheduler) for _ in range(3)] == [{"a": 7}, {"a": 7}, {"a": 6}]
    assert run_step(scheduler) == {"a": 1}  # decode: the sampled token is the one pending


def test_running_requests_go_first_and_waiting_fill_the_rest():
    scheduler = make_scheduler(num_pages=64, budget=10)
    scheduler.add(make_request("a", 8))
    assert run_step(scheduler) == {"a": 8}
    scheduler.add(make_request("b", 30))
    assert run_step(scheduler) == {"a": 1, "b": 9}
    assert run_step(scheduler) == {"a": 1, "b": 9}


def test_max_num_seqs_bounds_the_running_batch():
    scheduler = make_scheduler(num_pages=64, budget=100, max_seqs=2)
    for name in "abc":
        scheduler.add(make_request(name, 2))
    assert set(run_step(scheduler)) == {"a", "b"}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_newest_running_request_is_preempted_when_pages_run_out():
    scheduler = make_scheduler(num_pages=4, page_size=4, budget=100)
    scheduler.add(make_request("old", 7))  # 2 pages
    scheduler.add(make_request("new", 7))  # 2 pages: the pool is now full
    assert run_step(scheduler) == {"old": 7, "new": 7}
    run_step(scheduler)  # both reach 8 tokens: still 2 pages each
    batch = scheduler.schedule()  # the 9th token needs a third page for "old"
    assert [r.request_id for r in batch.preempted] == ["new"]
    assert [r.request_id for r in batch.requests] == ["old"]
    new = batch.preempted[0]
    assert (
        new.status == RequestStatus.WAITING and new.num_computed_tokens == 0 and new.page_ids == []
    )
    assert scheduler.waiting[0] is new


def test_request_larger_than_the_pool_is_refused():
    scheduler = make_scheduler(num_pages=2, page_size=4)
    with pytest.raises(ValueError, match="pool holds 8"):
        scheduler.add(make_request("big", 9))


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_never_deadlocks_or_leaks(seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_pages=12, page_size=4, budget=rng.choice([3, 7, 16]), max_seqs=6)
    requests = [make_request(f"r{i}", rng.randint(1, 20), rng.randint(1, 12)) for i in range(20)]
    for req in requests:
        scheduler.add(req)
    for _ in range(5000):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler)
        used = sum(len(r.page_ids) for r in scheduler.running)
        assert used == scheduler.kv.pool.num_used
    assert all(r.finish_reason == FinishReason.LENGTH for r in requests)
    assert [len(r.output_token_ids) for r in requests] == [r.params.max_tokens for r in requests]
    assert scheduler.kv.pool.num_free == 12


def test_token_ids_slice_prompt_and_output_as_one_sequence():
    req = make_request("a", 3)
    req.output_token_ids = [7, 8]
    full = [*req.prompt_token_ids, 7, 8]
    for start in range(6):
        for end in range(start, 6):
            assert req.token_ids(start, end) == full[start:end]


@pytest.mark.parametrize("seed", range(4))
def test_prefix_cache_and_preemption_through_update_keep_pages_exact(seed):
    """Shared prefixes, a pool small enough to preempt, every step applied by `update`: every
    page reference is a running request's or the tree's, the tree stays sound, and every
    request ends with all its tokens."""
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_pages=10, page_size=4, budget=rng.choice([5, 9]), prefix_cache=True
    )
    shared = list(range(100, 111))
    requests = []
    for i in range(12):
        prompt = shared[: rng.randint(1, len(shared))] + [200 + i] * rng.randint(1, 6)
        requests.append(make_request(f"r{i}", 0, rng.randint(4, 16), prompt))
        scheduler.add(requests[-1])
    cache, pool = scheduler.kv.prefix_cache, scheduler.kv.pool
    for step in range(5000):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler, token=step % 50)
        cache.check_integrity()
        references = sum(pool.ref_count(page) for page in range(pool.num_pages))
        held = sum(len(r.page_ids) for r in scheduler.running) + cache.num_cached_pages
        assert references == held
    assert scheduler.num_preemptions > 0
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in requests)
    assert sum(r.num_cached_tokens for r in requests) > 0
    cache.reset()
    assert pool.num_free == 10


def decode_with_drafts(scheduler: Scheduler, req: Request, drafts: list[int], sampled: list[int]):
    """One step verifying `drafts` after `req`'s last token, the model sampling `sampled`."""
    req.spec_token_ids = list(drafts)
    batch = scheduler.schedule()
    (scheduled,) = batch.step.requests
    assert scheduled.num_speculative == len(drafts) and scheduled.num_sample_rows == len(sampled)
    output = StepOutput({req.request_id: [SampledToken(t, None) for t in sampled]})
    (update,) = scheduler.update(batch, output)
    return update


def test_update_with_fewer_accepted_tokens_than_computed_rolls_back_exactly():
    scheduler = make_scheduler(num_pages=32, page_size=4, budget=64, prefix_cache=True)
    req = make_request("a", 6)
    scheduler.add(req)
    run_step(scheduler, token=50)  # the prompt: 6 computed, token 50 sampled
    assert (req.num_computed_tokens, req.num_tokens, len(req.page_ids)) == (6, 7, 2)
    # Five drafts after 50; the model agrees with the first two only, then samples 62.
    update = decode_with_drafts(scheduler, req, [60, 61, 70, 71, 72], [60, 61, 62, 9, 9, 9])
    assert update.new_token_ids == [60, 61, 62] and update.finish_reason is None
    assert req.output_token_ids == [50, 60, 61, 62]
    # 50, 60 and 61 were computed and confirmed; 62 is pending; rejected drafts hold no page.
    assert (req.num_computed_tokens, req.num_tokens) == (9, 10)
    assert len(req.page_ids) == 3 and scheduler.kv.pool.num_used == 3
    # Only the two full pages of confirmed tokens are cached, not the drafts' page.
    cache = scheduler.kv.prefix_cache
    assert cache.num_cached_pages == 2
    assert cache.match([0, 1, 2, 3, 4, 5, 50, 60, 61, 70]).num_tokens == 8
    cache.check_integrity()
    # Nothing accepted: the sampled token alone is appended.
    update = decode_with_drafts(scheduler, req, [1, 2], [7, 8, 9])
    assert update.new_token_ids == [7] and req.num_computed_tokens == 10
    assert len(req.page_ids) == 3
    scheduler.finish(req, FinishReason.ABORT)
    cache.reset()
    assert scheduler.kv.pool.num_free == 32


def test_a_draft_accepted_past_a_stop_token_is_not_kept():
    scheduler = make_scheduler(num_pages=32, page_size=4, budget=64, prefix_cache=True)
    req = make_request("a", 5)
    scheduler.add(req)
    run_step(scheduler, token=50)
    update = decode_with_drafts(scheduler, req, [51, EOS, 53], [51, EOS, 53, 54])
    assert update.new_token_ids == [51, EOS] and update.finish_reason == FinishReason.STOP
    assert req.output_token_ids == [50, 51, EOS] and req.is_finished
    assert scheduler.kv.prefix_cache.num_cached_pages == 1  # tokens 0-3; EOS's page is not full
    scheduler.kv.prefix_cache.check_integrity()


def test_drafts_never_exceed_max_tokens():
    scheduler = make_scheduler(num_pages=32, page_size=4, budget=64)
    req = make_request("a", 5, max_tokens=3)
    scheduler.add(req)
    run_step(scheduler, token=50)
    req.spec_token_ids = [1, 2, 3, 4]
    batch = scheduler.schedule()
    assert batch.num_speculative == [1]  # 50 + one draft + the token after it = 3 tokens
    scheduler.update(batch, StepOutput({"a": [SampledToken(1, None), SampledToken(8, None)]}))
    assert req.output_token_ids == [50, 1, 8] and req.finish_reason == FinishReason.LENGTH


def test_held_pages_outlive_their_request_until_released():
    """A finished request's pages, held for another process still reading them, are not
    reused until the hold ends."""
    scheduler = make_scheduler(num_pages=4, page_size=4)
    req = make_request("a", 7)
    scheduler.add(req)
    run_step(scheduler)
    held = scheduler.kv.hold(req)
    scheduler.finish(req, FinishReason.STOP)
    assert held == [0, 1] and scheduler.kv.pool.num_free == 2
    scheduler.kv.release_held(held)
    assert scheduler.kv.pool.num_free == 4
