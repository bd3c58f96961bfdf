"""SamplingParams refuses what the engine cannot run, naming the parameter."""

from __future__ import annotations

import math

import pytest

from sluice import InvalidParameterError, SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 2**63),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", 1e-40),  # would underflow to 0 in float32
        ("repetition_penalty", 1e3),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("n", 0),
        ("logprobs", 21),
        ("seed", -1),
        ("seed", 2**64),
        ("stop", [""]),
        ("stop", 5),
        ("stop", ["x", 5]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("stop_token_ids", ["7"]),
        ("stop_token_ids", [1.0]),
    ],
)
def test_out_of_range_values_name_their_parameter(field, value):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert field in str(err.value)


def test_tiny_temperature_is_greedy_and_minus_one_top_k_is_off():
    params = SamplingParams(temperature=1e-300, top_k=-1)
    assert params.greedy and params.temperature == 0.0 and params.top_k == 0


def test_n_samples_get_consecutive_seeds():
    params = SamplingParams(n=3, seed=10, stop="x")
    assert [params.for_sample(i).seed for i in range(3)] == [10, 11, 12]
    assert params.stop == ["x"] and params.for_sample(1).n == 1


def test_the_largest_seed_wraps_round_for_later_samples():
    params = SamplingParams(n=3, seed=2**63 - 2)
    assert [params.for_sample(i).seed for i in range(3)] == [2**63 - 2, 2**63 - 1, 0]


def test_repetition_penalty_bounds_are_inclusive():
    assert SamplingParams(repetition_penalty=0.01).repetition_penalty == 0.01
    assert SamplingParams(repetition_penalty=100).repetition_penalty == 100
