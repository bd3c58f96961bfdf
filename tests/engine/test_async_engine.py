"""The engine thread: outputs reach asyncio callers, and a failed step does not end the service."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sluice import SamplingParams
from sluice.engine.async_engine import AsyncEngine, EngineStepError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


async def collect(engine: AsyncEngine, request_id: str, prompt: str) -> list[int]:
    request = engine.engine.prepare(prompt, GREEDY)
    return [t async for out in engine.generate(request_id, request) for t in out.new_token_ids]


def test_concurrent_callers_get_their_own_tokens(make_llm):
    llm = make_llm()
    expected = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in ("Hello", "The sea")]
    engine = AsyncEngine(lambda: llm.engine)
    try:

        async def both():
            return await asyncio.gather(
                collect(engine, "a", "Hello"), collect(engine, "b", "The sea")
            )

        assert list(asyncio.run(both())) == expected
    finally:
        engine.shutdown()


def test_a_failed_step_aborts_the_requests_in_flight_and_the_engine_carries_on(
    make_llm, monkeypatch
):
    llm = make_llm()
    expected = llm.generate(["Hello"], GREEDY)[0].outputs[0].token_ids
    real_execute = llm.engine.executor.execute
    calls = {"n": 0}

    def fail_on_third_step(batch):  # fault injection: a bug that strikes mid-generation
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_execute(batch)

    monkeypatch.setattr(llm.engine.executor, "execute", fail_on_third_step)
    engine = AsyncEngine(lambda: llm.engine)
    try:
        with pytest.raises(EngineStepError, match="injected failure"):
            asyncio.run(collect(engine, "doomed", "Hello"))
        assert engine.is_alive
        assert asyncio.run(collect(engine, "next", "Hello")) == expected
    finally:
        engine.shutdown()


def test_the_engine_is_built_and_stepped_on_the_engine_thread(make_llm, monkeypatch):
    llm = make_llm()
    threads = {}
    real_execute = llm.engine.executor.execute

    def build():
        threads["build"] = threading.get_ident()
        return llm.engine

    def execute(batch):
        threads["step"] = threading.get_ident()
        return real_execute(batch)

    monkeypatch.setattr(llm.engine.executor, "execute", execute)
    engine = AsyncEngine(build)
    try:
        asyncio.run(collect(engine, "a", "Hello"))
        assert threads["build"] == threads["step"] != threading.get_ident()
    finally:
        engine.shutdown()


def test_an_engine_that_fails_to_build_raises_its_error():
    def build():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine(build)
