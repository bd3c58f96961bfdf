"""Every refusal has OpenAI's error shape, the right status and names the parameter at fault."""

from __future__ import annotations

import httpx
import openai
import pytest
from live_server import MAX_MODEL_LEN, MODEL_NAME

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
LONG_TEXT = "word " * (MAX_MODEL_LEN + 50)

# (route, body, status, param)
CASES = [
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    (COMPLETIONS, {"prompt": "x", "n": "2"}, 400, "n"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt"),
    (COMPLETIONS, {"max_tokens": 1}, 400, "prompt"),
    (
        COMPLETIONS,
        {"prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (COMPLETIONS, {"prompt": "x", "suffix": "the end"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": "x", "best_of": 2}, 400, "best_of"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"42": 101}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "narrator", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
    ),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (
        CHAT,
        {"messages": USER, "tools": [{"type": "function"}]},
        400,
        "tools[0]",
    ),
    (CHAT, {"messages": USER, "tool_choice": "auto"}, 400, "tool_choice"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions"),
    (
        CHAT,
        {"messages": USER, "response_format": {"type": "json_schema"}},
        400,
        "response_format.json_schema",
    ),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "messages": USER}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    return error


@pytest.mark.parametrize(("route", "body", "status", "param"), CASES, ids=lambda v: str(v)[:40])
def test_error(client: httpx.Client, route: str, body: dict, status: int, param: str):
    assert_error(client.post(route, json=body), status, param)


def test_unsupported_features_say_so(client: httpx.Client):
    body = {"messages": USER, "functions": [{"name": "f"}]}
    error = assert_error(client.post(CHAT, json=body), 400, "functions")
    assert "not supported" in error["message"] and error["code"] == "unsupported_parameter"


@pytest.mark.parametrize(("route", "key"), [(COMPLETIONS, "prompt"), (CHAT, "messages")])
def test_prompt_longer_than_the_context_gives_both_lengths(
    client: httpx.Client, route: str, key: str
):
    value = LONG_TEXT if key == "prompt" else [{"role": "user", "content": LONG_TEXT}]
    num_tokens = client.post("/tokenize", json={key: value}).json()["count"]
    error = assert_error(client.post(route, json={key: value, "max_tokens": 1}), 400, key)
    assert str(num_tokens) in error["message"] and str(MAX_MODEL_LEN) in error["message"]


def test_malformed_json(client: httpx.Client):
    response = client.post(
        COMPLETIONS, content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400, None)
    assert "JSON" in error["message"] and error["code"] == "invalid_json"


def test_a_body_that_is_not_an_object(client: httpx.Client):
    assert_error(client.post(COMPLETIONS, json=["x"]), 400, None)


def test_unknown_route_and_method(client: httpx.Client):
    assert_error(client.get("/v1/nothing"), 404, None)
    assert_error(client.get(COMPLETIONS), 405, None)


def test_the_openai_client_sees_param_and_status(oai: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=MODEL_NAME, prompt="x", temperature=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-4", messages=USER)
    assert missing.value.body["code"] == "model_not_found"
