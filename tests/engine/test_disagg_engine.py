"""Prefill/decode disaggregation between two engines in one process: a real NIXL transfer (UCX
over TCP on loopback), exact pages, leases that end, and page runs."""

from __future__ import annotations

import os

import pytest
import torch
from model_harness import assert_no_leaks

from sluice.config import EngineConfig
from sluice.disagg.decode import TransferFailedError
from sluice.disagg.params import PendingPrefill, TransferRequest
from sluice.disagg.role import DisaggConfig
from sluice.disagg.transport import PageRun, page_runs
from sluice.engine.engine import Engine
from sluice.sampling_params import InvalidParameterError, SamplingParams

os.environ.setdefault("UCX_TLS", "tcp")  # before the first NIXL agent: loopback TCP only

PROMPT = "The history of the lighthouse begins with fires lit on hills to guide ships home"


def test_page_runs_join_pages_consecutive_on_both_sides():
    assert page_runs([4, 5, 6, 9, 10], [0, 1, 7, 8, 9]) == [
        PageRun(4, 0, 2),
        PageRun(6, 7, 1),
        PageRun(9, 8, 2),
    ]
    assert page_runs([], []) == []


@pytest.fixture(scope="module")
def engines(default_model):
    def make(role: str, **options) -> Engine:
        config = EngineConfig.create(quantization="none", compile=False, page_size=4)
        disagg = DisaggConfig(role, model_name="m", **options)
        return Engine(config, loaded=default_model, disagg=disagg)

    prefill, decode, both = make("prefill"), make("decode"), make("both")
    decode.disagg.add_peer(prefill.disagg.metadata())
    return prefill, decode, both


@pytest.fixture(scope="module")
def failing_decode(engines, default_model) -> Engine:
    """A decode instance whose every pull fails, and which fails the request then."""
    prefill = engines[0]
    config = EngineConfig.create(quantization="none", compile=False, page_size=4)
    disagg = DisaggConfig(
        "decode", model_name="m", on_transfer_failure="error", inject_transfer_error_rate=1.0
    )
    decode = Engine(config, loaded=default_model, disagg=disagg)
    decode.disagg.add_peer(prefill.disagg.metadata())
    return decode


def _run(*engines: Engine, until) -> list:
    outputs = []
    for _ in range(10_000):
        for engine in engines:
            outputs += engine.step()
        if until():
            return outputs
    raise AssertionError("did not finish")


def _prefill(prefill: Engine, ids: list[int], request_id: str) -> dict:
    params = SamplingParams(max_tokens=1)
    transfer = TransferRequest(remote_decode=True)
    prefill.add_request(request_id, prefill.make_request(ids, params, transfer=transfer))
    outputs = _run(prefill, until=lambda: not prefill.has_unfinished_requests())
    return outputs[-1].kv_transfer_params


def test_decode_pulls_exact_pages_and_answers_as_one_engine(engines):
    prefill, decode, both = engines
    ids = decode.encode_prompt(PROMPT)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    both.add_request("ref", both.prepare(ids, params))
    expected = [
        t
        for o in _run(both, until=lambda: not both.has_unfinished_requests())
        for t in o.new_token_ids
    ]

    kv_params = _prefill(prefill, ids, "p")
    assert prefill.disagg.leases.num_leases == 1
    transfer = TransferRequest.parse(kv_params)
    early = decode.add_request("d", decode.make_request(ids, params, transfer=transfer))
    assert early[0].new_token_ids == expected[:1]  # P's token, before any pull
    outputs = _run(prefill, decode, until=lambda: not decode.has_unfinished_requests())
    assert expected == early[0].new_token_ids + [t for o in outputs for t in o.new_token_ids]

    stats = decode.disagg.pulls.stats
    assert stats.completed == 1 and stats.pages == len(kv_params["remote_block_ids"])
    # The prompt's pages in D's prefix cache are P's, bit for bit.
    mine = decode.prefix_cache.match(ids, "").page_ids
    theirs = kv_params["remote_block_ids"][: len(mine)]
    assert len(mine) == (len(ids) - 1) // 4 > 0
    for a, b in zip(
        decode.executor.kv_cache.export_pages(mine),
        prefill.executor.kv_cache.export_pages(theirs),
        strict=True,
    ):
        assert torch.equal(a, b)
    _run(prefill, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert_no_leaks(prefill)
    assert_no_leaks(decode)
    assert_no_leaks(both)


def test_a_second_turn_pulls_only_what_decode_lacks(engines):
    prefill, decode, _ = engines
    ids = decode.encode_prompt(PROMPT + " and beyond")
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for turn, prompt in enumerate((ids, ids + decode.encode_prompt(" then what?"))):
        before = decode.disagg.pulls.stats.pages, decode.disagg.pulls.stats.cached_pages
        kv_params = _prefill(prefill, prompt, f"p{turn}")
        transfer = TransferRequest.parse(kv_params)
        decode.add_request(f"d{turn}", decode.make_request(prompt, params, transfer=transfer))
        _run(prefill, decode, until=lambda: not decode.has_unfinished_requests())
        pulled = decode.disagg.pulls.stats.pages - before[0]
        cached = decode.disagg.pulls.stats.cached_pages - before[1]
        assert pulled + cached == len(kv_params["remote_block_ids"]), decode.disagg.pulls.stats
        if turn == 1:
            assert cached == len(ids) // 4 > 0  # the first turn's whole pages were D's own
    _run(prefill, until=lambda: prefill.disagg.leases.num_leases == 0)


def test_an_abort_mid_pull_keeps_the_pages_until_the_transfer_ends(engines):
    prefill, decode, _ = engines
    ids = decode.encode_prompt(PROMPT * 4)
    transfer = TransferRequest.parse(_prefill(prefill, ids, "p-abort"))
    decode.add_request("d-abort", decode.make_request(ids, SamplingParams(), transfer=transfer))
    decode.step()  # admitted: pages allocated, parked for the pull
    decode.step()  # the pull starts
    assert decode.scheduler.pulling or decode.disagg.pulls.num_in_flight
    used = decode.pool.num_used
    decode.abort_request("d-abort")
    if decode.disagg.pulls.num_in_flight:  # the pages stay held while NIXL may write them
        assert decode.pool.num_used == used
    _run(prefill, decode, until=lambda: decode.disagg.pulls.num_in_flight == 0)
    _run(prefill, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert_no_leaks(decode)
    assert_no_leaks(prefill)


def test_transfer_params_must_fit_the_role_and_the_prompt(engines):
    prefill, decode, both = engines
    ids = decode.encode_prompt(PROMPT)
    with pytest.raises(InvalidParameterError, match="--role prefill"):
        both.make_request(ids, SamplingParams(), transfer=TransferRequest(remote_decode=True))
    params = TransferRequest.parse(_prefill(prefill, ids, "p-wrong"))
    with pytest.raises(InvalidParameterError, match="prompt tokens"):
        decode.make_request(ids[:-1], SamplingParams(), transfer=params)
    with pytest.raises(InvalidParameterError, match="lacks remote_block_ids"):
        TransferRequest.parse({"remote_engine_id": "x", "remote_host": "h", "remote_port": 1})
    prefill.disagg.leases.release_all()


def test_an_expired_lease_frees_the_pages(engines):
    prefill, _, _ = engines
    ids = prefill.encode_prompt(PROMPT)
    _prefill(prefill, ids, "p-expire")
    assert prefill.disagg.leases.num_pages == -(-len(ids) // 4)
    prefill.disagg.leases.expire(now=float("inf"))
    assert prefill.disagg.leases.num_expired >= 1
    assert_no_leaks(prefill)


def _reference(both: Engine, ids: list[int], params: SamplingParams) -> list[int]:
    both.add_request("ref", both.prepare(ids, params))
    outputs = _run(both, until=lambda: not both.has_unfinished_requests())
    return [t for o in outputs for t in o.new_token_ids]


def test_decode_admits_before_the_params_come_then_pulls(engines):
    """sglang-router's concurrent dispatch: D has the request (its pages allocated) while P
    still computes; the first token goes out and the pull starts when P's params come."""
    prefill, decode, both = engines
    ids = decode.encode_prompt(PROMPT + " in the room")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = _reference(both, ids, params)
    pending = PendingPrefill(room=7)
    transfer = TransferRequest(room=7, pending=pending)
    assert decode.add_request("d-room", decode.make_request(ids, params, transfer=transfer)) == []
    free_before = decode.pool.num_free
    assert decode.step() == []
    assert decode.disagg.pulls.num_awaiting_params == 1
    assert free_before - decode.pool.num_free == -(-len(ids) // 4)  # the whole prompt's pages
    assert decode.step() == []  # still waiting: nothing to compute, no token

    pending.resolve(TransferRequest.parse(_prefill(prefill, ids, "p-room")).remote_prefill)
    outputs = _run(prefill, decode, until=lambda: not decode.has_unfinished_requests())
    assert [t for o in outputs for t in o.new_token_ids] == expected
    assert decode.disagg.pulls.stats.completed >= 1
    _run(prefill, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert_no_leaks(decode)
    assert_no_leaks(prefill)


def test_an_abort_before_the_params_come_frees_both_sides(engines):
    prefill, decode, _ = engines
    ids = decode.encode_prompt(PROMPT + " and gone")
    pending = PendingPrefill(room=8)
    transfer = TransferRequest(room=8, pending=pending)
    decode.add_request("d-gone", decode.make_request(ids, SamplingParams(), transfer=transfer))
    decode.step()
    assert decode.disagg.pulls.num_awaiting_params == 1
    decode.abort_request("d-gone")
    assert_no_leaks(decode)  # the pages come back at once: nothing writes them
    released = prefill.disagg.num_released
    pending.resolve(TransferRequest.parse(_prefill(prefill, ids, "p-gone")).remote_prefill)
    _run(prefill, decode, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert prefill.disagg.num_released == released + 1  # D dropped the lease, not its expiry
    assert decode.disagg.pulls.num_in_flight == 0
    assert_no_leaks(prefill)


def test_params_for_another_prompt_fail_the_request(engines):
    prefill, decode, _ = engines
    ids = decode.encode_prompt(PROMPT)
    pending = PendingPrefill(room=9)
    transfer = TransferRequest(room=9, pending=pending)
    decode.add_request("d-other", decode.make_request(ids, SamplingParams(), transfer=transfer))
    decode.step()
    pending.resolve(TransferRequest.parse(_prefill(prefill, ids[:-1], "p-other")).remote_prefill)
    (output,) = decode.step()
    assert isinstance(output.error, InvalidParameterError) and output.finished
    assert "prompt tokens" in str(output.error)
    _run(prefill, decode, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert_no_leaks(decode)
    assert_no_leaks(prefill)


def test_on_transfer_failure_error_ends_the_request_cleanly(engines, failing_decode):
    prefill, _, _ = engines
    ids = failing_decode.encode_prompt(PROMPT)
    transfer = TransferRequest.parse(_prefill(prefill, ids, "p-fail"))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    early = failing_decode.add_request(
        "d-fail", failing_decode.make_request(ids, params, transfer=transfer)
    )
    assert early[0].new_token_ids == [transfer.remote_prefill.first_token_id]
    outputs = _run(
        prefill, failing_decode, until=lambda: not failing_decode.has_unfinished_requests()
    )
    (output,) = outputs
    assert output.finished and isinstance(output.error, TransferFailedError)
    assert "injected" in str(output.error) and output.new_token_ids == []
    assert failing_decode.disagg.pulls.stats.failures == {"injected": 1}
    _run(prefill, failing_decode, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert_no_leaks(failing_decode)
    assert_no_leaks(prefill)


def test_prefill_serves_a_pull_while_its_engine_is_busy(engines):
    """A READ needs P's side to progress: while P holds leases its transport does so from a
    thread of its own, so D's pull completes with P's engine thread away (in a long step)."""
    prefill, decode, _ = engines
    ids = decode.encode_prompt(PROMPT + " while the keeper was busy")
    transfer = TransferRequest.parse(_prefill(prefill, ids, "p-busy"))
    prefill.step()  # what P's next step starts with: looking at its leases
    completed = decode.disagg.pulls.stats.completed
    params = SamplingParams(max_tokens=2)
    decode.add_request("d-busy", decode.make_request(ids, params, transfer=transfer))
    _run(decode, until=lambda: decode.disagg.pulls.stats.completed == completed + 1)
    _run(decode, until=lambda: not decode.has_unfinished_requests())
    _run(prefill, until=lambda: prefill.disagg.leases.num_leases == 0)
    assert_no_leaks(decode)
    assert_no_leaks(prefill)
