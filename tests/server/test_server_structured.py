"""Constrained decoding, logit_bias and the small OpenAI gaps, through the official client
against the shared `sluice serve` of the default model."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from live_server import MODEL_NAME
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int
    city: str = Field(max_length=24)


SUBJECTS = [
    "a baker from Paris",
    "a retired sailor",
    "a young chess player",
    "a famous painter",
    "a doctor in Tokyo",
    "a farmer from Kansas",
    "a student of physics",
    "a jazz musician",
    "a mountain guide",
    "a software engineer in Berlin",
]


def test_parse_with_a_pydantic_model_always_gives_the_object(oai: openai.OpenAI):
    for subject in SUBJECTS:
        completion = oai.beta.chat.completions.parse(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Describe {subject} as JSON."}],
            response_format=Person,
            max_tokens=80,
            temperature=0,
        )
        message = completion.choices[0].message
        assert isinstance(message.parsed, Person), message.content
        assert completion.choices[0].finish_reason == "stop"


def test_json_object_output_always_parses(oai: openai.OpenAI):
    for topic in ("a cat", "the weather"):
        completion = oai.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Give me a JSON object about {topic}."}],
            response_format={"type": "json_object"},
            max_tokens=100,
            temperature=0,
        )
        choice = completion.choices[0]
        # An object may go on past max_tokens (json_object bounds nothing); one that ends parses.
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.startswith("{")


def test_regex_and_choice_hold_on_50_samples(oai: openai.OpenAI):
    pattern = r"[0-9]{3}-[a-z]{2}"
    regex = oai.completions.create(
        model=MODEL_NAME,
        prompt="A code:",
        max_tokens=12,
        temperature=1.5,
        n=50,
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    texts = [c.text for c in regex.choices]
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    assert len(set(texts)) > 5  # sampled, not one forced answer
    choices = ["red", "green", "blue"]
    chosen = oai.completions.create(
        model=MODEL_NAME,
        prompt="My favourite colour is",
        max_tokens=5,
        temperature=1.5,
        n=50,
        extra_body={"guided_choice": choices},
    )
    assert {c.text for c in chosen.choices} <= set(choices)
    assert len({c.text for c in chosen.choices}) > 1


def test_streaming_keeps_the_constraint(oai: openai.OpenAI):
    stream = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "A person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema()},
        },
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Person.model_validate_json(text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                    },
                }
            },
            "response_format.json_schema",
        ),
        ({"structured_outputs": {"regex": "([a-z"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ],
)
def test_an_uncompilable_constraint_is_a_400_naming_it(
    client: httpx.Client, body: dict, param: str
):
    response = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **body},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_logit_bias_bans_and_forces(oai: openai.OpenAI, client: httpx.Client):
    def tokens(**kwargs) -> list[str]:
        completion = oai.completions.create(
            model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, logprobs=0, **kwargs
        )
        return completion.choices[0].logprobs.tokens

    first = tokens(temperature=0)[0]
    body = {"prompt": first, "add_special_tokens": False}
    [first_id] = client.post("/tokenize", json=body).json()["tokens"]
    assert first not in tokens(temperature=0, logit_bias={str(first_id): -100})
    forced = client.post("/detokenize", json={"tokens": [30]}).json()["prompt"]
    assert tokens(temperature=1.0, seed=0, logit_bias={"30": 100}) == [forced] * 4
    for bias in ({"30": 101}, {"x": 1}, {"999999": 1}):
        response = client.post("/v1/completions", json={"prompt": "x", "logit_bias": bias})
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"


def test_model_retrieve_and_request_id(oai: openai.OpenAI, client: httpx.Client):
    model = oai.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")
    raw = oai.completions.with_raw_response.create(model=MODEL_NAME, prompt="x", max_tokens=1)
    assert raw.request_id and len(raw.request_id) == 32
    assert client.get("/health", headers={"x-request-id": "abc"}).headers["x-request-id"] == "abc"


def test_context_overflow_has_its_code(client: httpx.Client):
    response = client.post("/v1/completions", json={"prompt": [1] * 5000})
    assert response.json()["error"]["code"] == "context_length_exceeded"
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5000})
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_unsupported_parts_and_endpoints_say_what(client: httpx.Client):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    response = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": [image]}]}
    )
    assert response.status_code == 400
    assert "'image_url' are not supported" in response.json()["error"]["message"]
    for route in ("/v1/embeddings", "/v1/responses"):
        response = client.post(route, json={})
        assert response.status_code == 404
        assert f"POST {route} is not supported" in response.json()["error"]["message"]


def test_completion_logprob_tokens_rebuild_the_text(oai: openai.OpenAI):
    # The regex makes the model spell the emoji, whose bytes no single token of it holds.
    completion = oai.completions.create(
        model=MODEL_NAME,
        prompt="Coffee:",
        max_tokens=24,
        temperature=0,
        logprobs=1,
        extra_body={"structured_outputs": {"regex": "café ☕"}},
    )
    assert completion.choices[0].finish_reason == "stop"
    tokens = completion.choices[0].logprobs.tokens[:-1]  # the last: the stop token, by name
    rebuilt = b"".join(
        bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
        for t in tokens
    )
    assert any(t.startswith("bytes:") for t in tokens)
    assert rebuilt.decode() == completion.choices[0].text == "café ☕"
