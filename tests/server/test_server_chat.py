"""POST /v1/chat/completions through the official client and raw HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from live_server import MODEL_NAME

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Name another one."},
]


def greedy(oai: openai.OpenAI, messages=MESSAGES, max_tokens: int = 6, **kwargs):
    return oai.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs
    )


def test_chat_completion_shape_and_usage(oai: openai.OpenAI, client: httpx.Client):
    completion = greedy(oai, max_tokens=4)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    num_prompt_tokens = client.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert completion.usage.prompt_tokens == num_prompt_tokens
    assert 0 < completion.usage.completion_tokens <= 4
    assert completion.usage.total_tokens == num_prompt_tokens + completion.usage.completion_tokens


def test_text_content_parts_and_developer_role_prompt_like_plain_text(oai: openai.OpenAI):
    plain = greedy(oai)
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "You are a terse assistant."}]},
        *MESSAGES[1:3],
        {"role": "user", "content": [{"type": "text", "text": "Name another one."}]},
    ]
    with_parts = greedy(oai, parts)
    assert with_parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert with_parts.choices[0].message.content == plain.choices[0].message.content


def test_max_completion_tokens_wins_over_max_tokens(oai: openai.OpenAI):
    completion = greedy(oai, max_tokens=6, max_completion_tokens=2)
    assert completion.usage.completion_tokens == 2
    assert completion.choices[0].finish_reason == "length"


def test_streaming_chunk_shape(oai: openai.OpenAI):
    text = greedy(oai).choices[0].message.content
    stream = greedy(oai, stream=True, stream_options={"include_usage": True})
    first, *content_chunks, usage_chunk = list(stream)
    assert len({first.id, usage_chunk.id, *(c.id for c in content_chunks)}) == 1
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in content_chunks)
    assert "".join(c.choices[0].delta.content for c in content_chunks) == text
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and 0 < usage_chunk.usage.completion_tokens <= 6
    assert all(c.usage is None for c in [first, *content_chunks])


def test_streaming_n_samples_each_open_with_the_role(oai: openai.OpenAI):
    chunks = list(greedy(oai, max_tokens=3, n=2, stream=True))
    opened = {c.index for chunk in chunks for c in chunk.choices if c.delta.role == "assistant"}
    finished = {c.index for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert opened == finished == {0, 1}


def test_stop_strings_are_not_emitted(oai: openai.OpenAI):
    text = greedy(oai, max_tokens=8).choices[0].message.content
    stop = text[len(text) // 2 :][:2]
    [choice] = greedy(oai, max_tokens=8, stop=[stop]).choices
    assert (choice.message.content, choice.finish_reason) == (text[: text.index(stop)], "stop")


def test_logprobs_shape_with_the_chosen_token_among_top_logprobs(oai: openai.OpenAI):
    completion = greedy(oai, max_tokens=4, logprobs=True, top_logprobs=3)
    [choice] = completion.choices
    content = choice.logprobs.content
    assert len(content) == completion.usage.completion_tokens
    # An end-of-turn token has an entry too, though its text is not part of the content.
    assert "".join(t.token for t in content).startswith(choice.message.content)
    for entry in content:
        assert bytes(entry.bytes).decode(errors="replace") == entry.token and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.token in [top.token for top in entry.top_logprobs]
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_logprobs_without_top_logprobs(oai: openai.OpenAI):
    [choice] = greedy(oai, max_tokens=2, logprobs=True).choices
    assert choice.logprobs.content
    assert all(entry.top_logprobs == [] for entry in choice.logprobs.content)
    assert greedy(oai, max_tokens=2).choices[0].logprobs is None


def test_seed_makes_sampling_reproducible(oai: openai.OpenAI):
    def sample() -> list[str]:
        completion = oai.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=99, n=2
        )
        return [choice.message.content for choice in completion.choices]

    assert sample() == sample()


def test_response_format_text_and_sampling_parameters_are_accepted(client: httpx.Client):
    body = {
        "messages": MESSAGES,
        "max_completion_tokens": 3,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "temperature": 0.7,
        "top_p": 0.95,
        "top_k": 40,
        "min_p": 0.01,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "repetition_penalty": 1.05,
        "seed": 3,
        "stop": "\n\n",
        "logit_bias": {},
        "parallel_tool_calls": True,
        "metadata": {"unknown": "fields are ignored"},
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
