"""Hypothesis-made bodies, plausible or not, never get a 5xx.

Half the bodies are plausible (the right types, edge values included), so that about half the
requests really generate; the rest have one field, known or unknown, set to any JSON, or are any
JSON at all. `max_tokens` stays small so that what is accepted runs fast.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import MODEL_NAME

pytestmark = pytest.mark.slow

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same bodies every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
# Never null: a null max_tokens means "no limit", which would make an accepted request slow.
MAX_TOKENS = st.integers(1, 3)
TOKEN_IDS = st.lists(st.integers(0, 49_151), min_size=1, max_size=6)
STOP = st.text(min_size=1, max_size=3)

# Values of the right type, mostly in range; the edges (huge top_k and seeds, tiny temperatures)
# are where a value could slip past validation and fail inside the engine.
SAMPLING = {
    "model": st.just(MODEL_NAME),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50) | st.integers(0, 2**63 - 1),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": STOP | st.lists(STOP, max_size=3),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
COMPLETION = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=20)
        | st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3)
        | TOKEN_IDS
        | st.lists(TOKEN_IDS, min_size=1, max_size=3),
        "max_tokens": MAX_TOKENS,
    },
    optional={**SAMPLING, "logprobs": st.integers(0, 5), "echo": st.booleans()},
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.text(max_size=12)
        | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
            max_size=2,
        ),
    }
)
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_completion_tokens": MAX_TOKENS},
    optional={
        **SAMPLING,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "response_format": st.just({"type": "text"}),
    },
)
TOKENIZE = st.fixed_dictionaries(
    {}, optional={"prompt": st.text(max_size=20), "messages": st.lists(MESSAGE, max_size=2)}
)
DETOKENIZE = st.fixed_dictionaries({"tokens": TOKEN_IDS})


def fuzzed(bodies: st.SearchStrategy[dict]) -> st.SearchStrategy[object]:
    """Plausible bodies; the same with one field (known or not) set to any JSON; any JSON."""
    one_field_off = st.builds(
        lambda body, key, value: {**body, key: value},
        bodies,
        st.sampled_from([*SAMPLING, "prompt", "messages", "max_tokens", "logprobs", "tokens"])
        | st.text(max_size=6),
        JSON,
    )
    return st.one_of(bodies, bodies, one_field_off, JSON)


def assert_no_server_error(response: httpx.Response, body: object) -> None:
    assert response.status_code < 500, f"{body!r} -> {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line]
        assert events[-1] == "data: [DONE]"
        assert all('"server_error"' not in event for event in events), (
            f"{body!r} -> {response.text}"
        )


@pytest.mark.parametrize(
    ("route", "bodies"),
    [
        ("/v1/completions", fuzzed(COMPLETION)),
        ("/v1/chat/completions", fuzzed(CHAT)),
        ("/tokenize", fuzzed(TOKENIZE)),
        ("/detokenize", fuzzed(DETOKENIZE)),
    ],
    ids=["completions", "chat", "tokenize", "detokenize"],
)
def test_fuzzed_bodies_never_get_a_server_error(
    client: httpx.Client, route: str, bodies: st.SearchStrategy
):
    @FUZZ_SETTINGS
    @given(body=bodies)
    def post(body: object) -> None:
        assert_no_server_error(client.post(route, json=body), body)

    post()


@FUZZ_SETTINGS
@given(raw=st.binary(max_size=40) | JSON.map(lambda v: json.dumps(v).encode()[:-1]))
def test_undecodable_bodies_get_a_400(client: httpx.Client, raw: bytes):
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
