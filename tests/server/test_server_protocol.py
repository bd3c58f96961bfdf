"""Request bodies and metrics bookkeeping on their own: no model, no server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from sluice.engine.output import RequestOutput
from sluice.engine.request import FinishReason
from sluice.sampling_params import InvalidParameterError
from sluice.server.metrics import ServerMetrics
from sluice.server.openai import served_model_name
from sluice.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


def test_null_fields_take_their_defaults():
    request = CompletionRequest.model_validate(
        {"prompt": "x", "max_tokens": None, "temperature": None}
    )
    assert (request.max_tokens, request.temperature) == (16, 1.0)
    assert not request.was_given("max_tokens")


@pytest.mark.parametrize(
    "body", [{"prompt": "x", "n": "2"}, {"prompt": "x", "n": 1.0}, {"prompt": "x", "echo": 1}]
)
def test_types_are_strict(body: dict):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_every_prompt_form_is_a_batch(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


def test_an_empty_prompt_is_refused():
    with pytest.raises(InvalidParameterError):
        CompletionRequest(prompt=[]).prompts()


def test_unsupported_features_are_named():
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "functions": [{"name": "f"}],
            "function_call": "auto",
            "response_format": {"type": "json_object"},
            "logit_bias": {"1": 2},
        }
    )
    assert [param for param, _ in request.unsupported()] == ["functions", "function_call"]
    harmless = {"messages": [{"role": "user", "content": "x"}], "tools": [], "tool_choice": "none"}
    assert ChatCompletionRequest.model_validate(harmless).unsupported() == []


def test_developer_messages_reach_the_template_as_system():
    message = ChatMessage(role="developer", content=[{"type": "text", "text": "Be brief."}])
    assert message.for_template() == {
        "role": "system",
        "content": [{"type": "text", "text": "Be brief."}],
    }


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (None, "smollm2-135m-instruct"),
        ("/models/Qwen3-0.6B-Q8_0.gguf", "Qwen3-0.6B-Q8_0"),
        ("/models/Qwen3-0.6B/", "Qwen3-0.6B"),
    ],
)
def test_served_model_name(model, name):
    assert served_model_name(model) == name


# What ServerMetrics reads of an Engine.
IDLE_ENGINE = SimpleNamespace(
    num_running=0,
    num_waiting=0,
    prefix_cache=None,
    state_pool=None,
    disagg=None,
    executor=SimpleNamespace(sparse=None),
    proposer=None,
    pool=SimpleNamespace(num_used=0, num_pages=8),
)


def _output(index: int, finished: bool, num_output_tokens: int) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        index=index,
        new_token_ids=[7],
        new_text="x",
        finished=finished,
        finish_reason=FinishReason.LENGTH if finished else None,
        num_prompt_tokens=5,
        num_output_tokens=num_output_tokens,
        num_cached_tokens=2,
        queue_time=0.01,
    )


def test_a_tracker_counts_tokens_latencies_and_aborted_samples():
    metrics = ServerMetrics(IDLE_ENGINE)
    tracker = metrics.track(arrival=0.0, num_samples=2)
    for out in (_output(0, False, 1), _output(1, False, 1), _output(0, True, 2)):
        tracker.observe(out)
    tracker.close()  # sample 1 never finished: its client left

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert value("sluice:prompt_tokens_total") == 5  # once per prompt
    assert value("sluice:prefix_cache_queries_total") == 10  # once per sample
    assert value("sluice:prefix_cache_hits_total") == 4
    assert value("sluice:generation_tokens_total") == 3
    assert value("sluice:time_to_first_token_seconds_count") == 1
    assert value("sluice:request_queue_time_seconds_count") == 2
    assert value("sluice:inter_token_latency_seconds_count") == 1
    assert value("sluice:request_success_total", finished_reason="length") == 1
    assert value("sluice:request_success_total", finished_reason="abort") == 1
    assert value("sluice:e2e_request_latency_seconds_count") == 0  # not every sample finished
    assert value("sluice:kv_cache_pages_total") == 8
