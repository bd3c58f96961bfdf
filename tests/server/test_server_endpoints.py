"""The endpoints around generation: health, version, models, tokenize, metrics, the schema."""

from __future__ import annotations

import httpx
import openai
import pytest
from live_server import MAX_MODEL_LEN, MODEL_NAME

import sluice

pytestmark = pytest.mark.slow


def test_health_and_version(client: httpx.Client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/version").json() == {"version": sluice.__version__}


def test_models_lists_the_served_model(oai: openai.OpenAI):
    models = oai.models.list().data
    assert [model.id for model in models] == [MODEL_NAME]
    assert models[0].owned_by == "sluice"
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_openapi_schema_describes_every_route(client: httpx.Client):
    schema = client.get("/openapi.json").json()
    paths = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
    assert paths | {"/tokenize", "/detokenize", "/version"} <= set(schema["paths"])
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest"
    )
    assert "text/event-stream" in chat["responses"]["200"]["content"]


def test_tokenize_and_detokenize_round_trip(client: httpx.Client):
    tokens = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    text = client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"


def test_tokenize_messages_counts_the_chat_prompt(client: httpx.Client):
    messages = [{"role": "user", "content": "Hi"}]
    tokens = client.post("/tokenize", json={"messages": messages}).json()
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert tokens["count"] == chat["usage"]["prompt_tokens"]


def test_metrics_parse_and_name_what_the_issue_asks_for(server):
    metrics = server.metrics()
    for gauge in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_pages_used",
        "kv_cache_pages_total",
    ):
        assert f"sluice:{gauge}" in metrics
    assert metrics["sluice:kv_cache_pages_total"] > 0
    for counter in (
        "prompt_tokens",
        "generation_tokens",
        "prefix_cache_queries",
        "prefix_cache_hits",
    ):
        assert f"sluice:{counter}_total" in metrics
    for reason in ("stop", "length", "abort"):
        assert f'sluice:request_success_total{{finished_reason="{reason}"}}' in metrics
    for histogram in (
        "time_to_first_token",
        "inter_token_latency",
        "e2e_request_latency",
        "request_queue_time",
    ):
        assert f"sluice:{histogram}_seconds_count" in metrics


def test_metrics_count_a_request(server, client: httpx.Client):
    before = server.metrics()
    body = {"prompt": "One two three", "max_tokens": 3, "temperature": 0}
    usage = client.post("/v1/completions", json=body).json()["usage"]
    after = server.metrics()

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("sluice:prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("sluice:generation_tokens_total") == usage["completion_tokens"]
    assert grew("sluice:prefix_cache_queries_total") == usage["prompt_tokens"]
    assert grew("sluice:prefix_cache_hits_total") == usage["prompt_tokens_details"]["cached_tokens"]
    finished = sum(
        grew(f'sluice:request_success_total{{finished_reason="{r}"}}') for r in ("stop", "length")
    )
    assert finished == 1
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert grew(f"sluice:{histogram}_seconds_count") == 1
    assert grew("sluice:inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
