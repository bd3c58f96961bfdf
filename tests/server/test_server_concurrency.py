"""Concurrent requests batch together and get what they would get alone; leavers free their pages."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from live_server import MODEL_NAME, ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = [
    "The weather today is",
    "My favourite book is",
    "In the year 2050, cities will",
    "A good breakfast includes",
]
NUM_STREAMS = 50
MAX_TOKENS = 16


def test_concurrent_streams_match_sequential_greedy_runs(server: ServerProcess, oai: openai.OpenAI):
    sequential = [
        oai.completions.create(model=MODEL_NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]
    texts, peak_running = asyncio.run(
        _stream_all(server, [PROMPTS[i % len(PROMPTS)] for i in range(NUM_STREAMS)])
    )
    assert texts == [sequential[i % len(PROMPTS)] for i in range(NUM_STREAMS)]
    assert peak_running > 1, "the streams were not batched together"


async def _stream_all(server: ServerProcess, prompts: list[str]) -> tuple[list[str], float]:
    client = server.async_openai()
    streams = asyncio.gather(*(_stream_text(client, prompt) for prompt in prompts))
    peak_running = await _peak_running_while(server, streams)
    return await streams, peak_running


async def _stream_text(client: openai.AsyncOpenAI, prompt: str) -> str:
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    return "".join([chunk.choices[0].text async for chunk in stream])


async def _peak_running_while(server: ServerProcess, work: asyncio.Future) -> float:
    """Scrapes /metrics until `work` is done; answering at all shows the event loop is free."""
    peak = 0.0
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        while not work.done():
            text = (await http.get("/metrics")).text
            running = next(
                line
                for line in text.splitlines()
                if line.startswith("sluice:num_requests_running ")
            )
            peak = max(peak, float(running.split()[1]))
            await asyncio.sleep(0.05)
    return peak


def _is_idle(metrics: dict[str, float]) -> bool:
    """No request runs, waits or holds a KV page: every page in use is the prefix cache's."""
    running = metrics["sluice:num_requests_running"] + metrics["sluice:num_requests_waiting"]
    return (
        running == 0
        and metrics["sluice:kv_cache_pages_used"] == metrics["sluice:kv_cache_pages_cached"]
    )


def test_clients_that_leave_free_their_pages(server: ServerProcess):
    before = server.metrics()
    assert _is_idle(before)
    body = {
        "prompt": "Write a very long story about a dragon.",
        "max_tokens": 900,
        "ignore_eos": True,
    }
    chat_body = {**body, "messages": [{"role": "user", "content": "Tell me a very long story."}]}
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)  # mid-stream: a token has come
            assert server.metrics()["sluice:num_requests_running"] == 1
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up before the answer comes
            http.post("/v1/chat/completions", json=chat_body, timeout=1.0)
    deadline = time.monotonic() + 30.0
    while not _is_idle(after := server.metrics()):
        assert time.monotonic() < deadline, f"aborted requests kept their KV pages: {after}"
        time.sleep(0.2)
    aborted = 'sluice:request_success_total{finished_reason="abort"}'
    assert after[aborted] == before[aborted] + 2
