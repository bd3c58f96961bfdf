"""The draft policy (spec/policy.py): how many drafts pay for their rows, per request's
acceptance rate and the batch, and the rate each request's verify steps give."""

from __future__ import annotations

import pytest

from sluice.spec.policy import PROBE_INTERVAL, AcceptanceEstimate, DraftPolicy


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.2, 0), (0.25, 0), (0.5, 1), (0.6, 2), (0.8, 5), (0.95, 5)],
)
def test_a_lone_stream_drafts_while_rate_to_the_i_exceeds_the_row_cost(rate, expected):
    """One request, a draft row costing a quarter of a decode step: the i-th draft pays while
    rate^i > 0.25 (0.6: 0.6 and 0.36 do, 0.216 does not), at most k = 5."""
    assert DraftPolicy(5, 0.25).paying_drafts(rate, batch_size=1) == expected


@pytest.mark.parametrize(("batch_size", "expected"), [(1, 5), (4, 5), (16, 1), (64, 0)])
def test_larger_batches_draft_less(batch_size, expected):
    """A token's share of a step without drafts is (1 + 0.25 (B - 1)) / B decode steps: at
    rate 0.9 drafts pay while 0.9^i * share > 0.25 (B = 16: share 0.297, only 0.9 > 0.842;
    B = 64: share 0.262, not even the first)."""
    assert DraftPolicy(5, 0.25).paying_drafts(0.9, batch_size) == expected


def test_without_a_cost_every_request_drafts_k():
    estimate = AcceptanceEstimate()
    for _ in range(20):
        estimate.record(5, 0)
    assert DraftPolicy(7, 0.0).num_drafts(estimate, batch_size=3) == 7


def test_the_rate_follows_the_verify_steps_with_decay():
    """Accepted over accepted plus rejections, the earlier counts weighted 0.8 per step, from a
    prior of 1 in 2: all 5 rejected gives 0.8 / 2.6; then all 5 accepted 5.64 / 7.08."""
    estimate = AcceptanceEstimate()
    assert estimate.rate == 0.5
    estimate.record(5, 0)
    assert estimate.rate == pytest.approx(0.8 / 2.6)
    estimate.record(5, 5)
    assert estimate.rate == pytest.approx(5.64 / 7.08)


def test_a_request_whose_drafts_fail_stops_drafting_and_probes_with_one():
    """After a run of rejections the request proposes nothing, but every PROBE_INTERVAL steps
    one draft, to notice when its text becomes predictable; accepted probes bring drafting back."""
    policy, estimate = DraftPolicy(5, 0.25), AcceptanceEstimate()
    for _ in range(4):
        estimate.record(5, 0)
    decisions = [policy.num_drafts(estimate, batch_size=1) for _ in range(2 * PROBE_INTERVAL)]
    assert decisions == ([0] * (PROBE_INTERVAL - 1) + [1]) * 2
    for _ in range(3):
        estimate.record(1, 1)
    assert policy.num_drafts(estimate, batch_size=1) > 1
