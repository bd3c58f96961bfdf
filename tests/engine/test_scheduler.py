"""Scheduler and page pool on their own: no model, no torch."""

from __future__ import annotations

import random

import pytest

from sluice.config import SchedulerConfig
from sluice.engine.cache_manager import KVCacheManager, OutOfPagesError, PagePool
from sluice.engine.request import Request, RequestStatus
from sluice.engine.scheduler import Scheduler
from sluice.sampling_params import SamplingParams


def make_request(name: str, prompt_len: int) -> Request:
    return Request(
        name, list(range(prompt_len)), SamplingParams(max_tokens=1000), max_total_tokens=10_000
    )


def make_scheduler(
    num_pages: int, page_size: int = 4, budget: int = 16, max_seqs: int = 8
) -> Scheduler:
    kv = KVCacheManager(PagePool(num_pages), page_size)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv)


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, pretend the model ran, and emit one token for every request that caught up."""
    batch = scheduler.schedule()
    for req, n in zip(batch.requests, batch.num_tokens):
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(0)
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
    lengths = {}
    for i in range(20):
        req = make_request(f"r{i}", rng.randint(1, 20))
        lengths[req.request_id] = rng.randint(1, 12)
        scheduler.add(req)
    finished = 0
    for _ in range(5000):
        if not scheduler.num_unfinished:
            break
        run_step(scheduler)
        for req in list(scheduler.running):
            if len(req.output_token_ids) >= lengths[req.request_id]:
                scheduler.finish(req)
                finished += 1
        used = sum(len(r.page_ids) for r in scheduler.running)
        assert used == scheduler.kv.pool.num_used
    assert finished == 20
    assert scheduler.kv.pool.num_free == 12


def test_token_ids_slice_prompt_and_output_as_one_sequence():
    req = make_request("a", 3)
    req.output_token_ids = [7, 8]
    full = [*req.prompt_token_ids, 7, 8]
    for start in range(6):
        for end in range(start, 6):
            assert req.token_ids(start, end) == full[start:end]
