"""One HTTP request's prompts running in the AsyncEngine, and the admission rule in front of it.

A request starts in the engine as soon as it is admitted, not when its response is first read:
each prompt is pumped by a task of its own into one queue, so a batch of prompts comes back
interleaved in arrival order, and the queue bound counts a request from the moment it passes.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sluice.engine.async_engine import AsyncEngine
from sluice.engine.output import RequestOutput
from sluice.engine.request import PreparedRequest
from sluice.server.errors import APIError
from sluice.server.metrics import ServerMetrics

_PROMPT_DONE = object()


@dataclass
class ChoiceOutput:
    """One engine output, placed among the response's choices (prompt-major, as OpenAI orders)."""

    choice: int
    prompt: int
    output: RequestOutput


class Generation:
    """Iterate for the outputs of every prompt; `cancel()` aborts what is still running."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        request_id: str,
        requests: list[PreparedRequest],
    ) -> None:
        self._n = requests[0].params.n
        self._arrival = time.monotonic()
        self._queue: asyncio.Queue[ChoiceOutput | Exception | object] = asyncio.Queue()
        self._started: set[int] = set()  # prompts with at least one output
        self._tasks = [
            asyncio.create_task(
                self._pump(index, engine.generate(f"{request_id}-{index}", request), metrics)
            )
            for index, request in enumerate(requests)
        ]

    @property
    def num_waiting(self) -> int:
        """Prompts in the engine that have not produced a token yet."""
        return sum(
            1 for i, task in enumerate(self._tasks) if i not in self._started and not task.done()
        )

    def cancel(self) -> None:
        """Abort every prompt still running; AsyncEngine.generate frees its pages when cancelled."""
        for task in self._tasks:
            task.cancel()

    async def __aiter__(self) -> AsyncIterator[ChoiceOutput]:
        remaining = len(self._tasks)
        try:
            while remaining:
                item = await self._queue.get()
                if item is _PROMPT_DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            self.cancel()  # the reader left early (an error, a disconnect): stop generating

    async def _pump(
        self, prompt: int, outputs: AsyncIterator[RequestOutput], metrics: ServerMetrics
    ) -> None:
        tracker = metrics.track(self._arrival, self._n)
        try:
            async for out in outputs:
                self._started.add(prompt)
                tracker.observe(out)
                self._queue.put_nowait(ChoiceOutput(prompt * self._n + out.index, prompt, out))
        except Exception as exc:  # the engine refused or failed this prompt: the reader raises it
            self._queue.put_nowait(exc)
        finally:
            tracker.close()
            self._queue.put_nowait(_PROMPT_DONE)


class GenerationQueue:
    """Admits requests into the engine while fewer than `max_queue` prompts wait for their first token."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, max_queue: int | None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._max_queue = max_queue
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()

    @property
    def num_waiting(self) -> int:
        return sum(generation.num_waiting for generation in self._live)

    def start(self, request_id: str, requests: list[PreparedRequest]) -> Generation:
        """Raises APIError 503 when the engine is gone or the queue is full, before anything starts."""
        if not self._engine.is_alive:
            raise APIError(503, "the engine has stopped", code="engine_dead")
        if self._max_queue is not None and (num_waiting := self.num_waiting) >= self._max_queue:
            raise APIError(
                503,
                f"the server is at capacity: {num_waiting} requests are already waiting",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        generation = Generation(self._engine, self._metrics, request_id, requests)
        self._live.add(generation)
        return generation

    def cancel_all(self) -> None:
        for generation in list(self._live):
            generation.cancel()
