"""POST /v1/completions through the official client and raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from live_server import MODEL_NAME

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"


def greedy(oai: openai.OpenAI, prompt, max_tokens: int = 8, **kwargs):
    return oai.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs
    )


def test_completion_shape_and_usage(oai: openai.OpenAI, client: httpx.Client):
    completion = greedy(oai, PROMPT, max_tokens=5)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == MODEL_NAME
    [choice] = completion.choices
    assert choice.index == 0 and choice.text and choice.finish_reason == "length"
    num_prompt_tokens = client.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (num_prompt_tokens, 5)
    assert usage.total_tokens == num_prompt_tokens + 5


def test_cached_tokens_count_the_prefix_cache_hit(oai: openai.OpenAI, client: httpx.Client):
    """A prompt no other test sends: nothing cached the first time; the second time, every
    whole 16-token page but the one holding the last token (which must be computed)."""
    prompt = "Cached-token accounting: " + " ".join(f"item{i}" for i in range(30))
    num_prompt_tokens = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    first, second = (greedy(oai, prompt, max_tokens=1).usage for _ in range(2))
    assert first.prompt_tokens_details.cached_tokens == 0
    expected = (num_prompt_tokens - 1) // 16 * 16
    assert expected >= 32
    assert second.prompt_tokens_details.cached_tokens == expected


def test_model_may_be_omitted(client: httpx.Client):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert response.status_code == 200, response.text


def test_every_prompt_form_gives_the_same_greedy_text(oai: openai.OpenAI, client: httpx.Client):
    ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    text = greedy(oai, PROMPT).choices[0].text
    assert greedy(oai, ids).choices[0].text == text
    batch = greedy(oai, [PROMPT, "Once upon a time"]).choices
    assert [c.index for c in batch] == [0, 1] and batch[0].text == text
    id_batch = greedy(oai, [ids, ids]).choices
    assert [c.text for c in id_batch] == [text, text]


def test_max_tokens_defaults_to_16(client: httpx.Client):
    body = {"prompt": "Count: 1, 2, 3, 4,", "temperature": 0}
    usage = client.post("/v1/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] <= 16


def test_repeated_prompt_reports_cached_tokens(oai: openai.OpenAI):
    long_prompt = (
        "Here is a list of fruits: apple, banana, cherry, date, elderberry, fig, grape, " * 3
    )
    greedy(oai, long_prompt, max_tokens=1)
    usage = greedy(oai, long_prompt, max_tokens=1).usage
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_echo_puts_the_prompt_first(oai: openai.OpenAI):
    text = greedy(oai, PROMPT).choices[0].text
    assert greedy(oai, PROMPT, echo=True).choices[0].text == PROMPT + text
    chunks = list(greedy(oai, PROMPT, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + text


def test_stop_string_ends_the_text_before_it(oai: openai.OpenAI):
    text = greedy(oai, PROMPT, max_tokens=12).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.index(stop)]
    for stop_param in (stop, [stop, "never-generated"]):
        [choice] = greedy(oai, PROMPT, max_tokens=12, stop=stop_param).choices
        assert (choice.text, choice.finish_reason) == (expected, "stop")


def test_logprobs_shape(oai: openai.OpenAI):
    [choice] = greedy(oai, PROMPT, max_tokens=4, logprobs=3).choices
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert top[token] == pytest.approx(logprob)  # greedy: the chosen token is the likeliest
        assert logprob == pytest.approx(max(top.values()))


def test_streaming_chunks_add_up_to_the_completion(oai: openai.OpenAI):
    text = greedy(oai, PROMPT).choices[0].text
    chunks = list(greedy(oai, PROMPT, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8


def test_raw_stream_is_server_sent_events_ending_in_done(client: httpx.Client):
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in events[:-1])


def test_n_samples_per_prompt_come_prompt_major(oai: openai.OpenAI, client: httpx.Client):
    prompts = [PROMPT, "Hi there"]
    expected = [greedy(oai, p, max_tokens=3).choices[0].text for p in prompts]
    completion = greedy(oai, prompts, max_tokens=3, n=2)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [c.text for c in completion.choices] == [expected[0]] * 2 + [expected[1]] * 2
    prompt_tokens = sum(
        client.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts
    )
    assert completion.usage.prompt_tokens == prompt_tokens  # once per prompt, not per sample


def test_seed_makes_sampling_reproducible(oai: openai.OpenAI):
    def sample() -> str:
        kwargs = dict(temperature=1.0, seed=1234, max_tokens=10)
        return oai.completions.create(model=MODEL_NAME, prompt=PROMPT, **kwargs).choices[0].text

    assert sample() == sample()


def test_every_sampling_parameter_is_accepted(client: httpx.Client):
    body = {
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.1,
        "seed": 7,
        "stop": ["\n\n"],
        "n": 1,
        "best_of": 1,
        "user": "ignored",
        "an_unknown_field": {"is": "ignored"},
    }
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3
