"""Hypothesis-made bodies, plausible or not, never get a 5xx, on every route.

Half the bodies are plausible (the right types, edge values included), so that about half the
requests really generate; the rest have one field, known or unknown, set to any JSON, or are any
JSON at all. Text is any Unicode, lone surrogates included: bodies travel as `ensure_ascii` JSON,
whose `\\ud800` escapes carry what UTF-8 cannot. `max_tokens` stays small so that what is
accepted runs fast.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import MODEL_NAME, ServerProcess

pytestmark = pytest.mark.slow

FUZZ_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same bodies every run: CI failures reproduce
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Any code point, lone surrogates (category Cs) included, and often one for sure.
CHARACTER = st.characters(codec=None, exclude_categories=())
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


def text(min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[str]:
    any_text = st.text(CHARACTER, min_size=min_size, max_size=max_size)
    with_a_surrogate = st.builds(
        lambda head, surrogate, tail: head + surrogate + tail,
        st.text(max_size=max_size // 2),
        SURROGATE,
        st.text(max_size=max_size // 2),
    )
    return any_text | with_a_surrogate


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
# Never null: a null max_tokens means "no limit", which would make an accepted request slow.
MAX_TOKENS = st.integers(1, 3)
TOKEN_IDS = st.lists(st.integers(0, 49_151), min_size=1, max_size=6)
STOP = text(min_size=1, max_size=3)

# Values of the right type, mostly in range; the edges (huge top_k and seeds, tiny temperatures)
# are where a value could slip past validation and fail inside the engine.
SAMPLING = {
    "model": st.just(MODEL_NAME) | text(max_size=4),
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
        "prompt": text(min_size=1, max_size=20)
        | st.lists(text(min_size=1, max_size=6), min_size=1, max_size=3)
        | TOKEN_IDS
        | st.lists(TOKEN_IDS, min_size=1, max_size=3),
        "max_tokens": MAX_TOKENS,
    },
    optional={**SAMPLING, "logprobs": st.integers(0, 5), "echo": st.booleans()},
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": text(max_size=12)
        | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": text(max_size=8)}),
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
    {}, optional={"prompt": text(max_size=20), "messages": st.lists(MESSAGE, max_size=2)}
)
DETOKENIZE = st.fixed_dictionaries({"tokens": TOKEN_IDS})


def fuzzed(bodies: st.SearchStrategy[dict]) -> st.SearchStrategy[object]:
    """Plausible bodies; the same with one field (known or not) set to any JSON; any JSON."""
    one_field_off = st.builds(
        lambda body, key, value: {**body, key: value},
        bodies,
        st.sampled_from([*SAMPLING, "prompt", "messages", "max_tokens", "logprobs", "tokens"])
        | text(max_size=6),
        JSON,
    )
    return st.one_of(bodies, bodies, one_field_off, JSON)


def post_json(client: httpx.Client, route: str, body: object) -> httpx.Response:
    content = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel escaped
    return client.post(route, content=content, headers={"content-type": "application/json"})


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
        assert_no_server_error(post_json(client, route, body), body)

    post()


GET_ROUTES = ["/health", "/version", "/metrics", "/v1/models", "/docs", "/redoc", "/openapi.json"]


@FUZZ_SETTINGS
@given(
    route=st.sampled_from(GET_ROUTES),
    query=st.binary(max_size=16),
    body=JSON,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
)
def test_every_route_answers_any_query_and_body_without_a_server_error(
    client: httpx.Client, route: str, query: bytes, body: object, method: str
):
    url = httpx.URL(route, query=b"x=" + b"".join(b"%%%02X" % byte for byte in query))
    content = json.dumps(body).encode()
    response = client.request(method, url, content=content)
    assert response.status_code < 500, f"{method} {url} {body!r} -> {response.text}"
    assert response.status_code in ((200,) if method == "GET" else (405,))


@FUZZ_SETTINGS
@given(raw=st.binary(max_size=40) | JSON.map(lambda v: json.dumps(v).encode()[:-1]))
def test_undecodable_bodies_get_a_400(client: httpx.Client, raw: bytes):
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text


def test_the_server_is_healthy_and_logged_no_traceback_after_the_fuzz(
    server: ServerProcess, client: httpx.Client
):
    assert client.get("/health").json() == {"status": "ok"}
    assert "Traceback" not in server.log_path.read_text(errors="replace")
