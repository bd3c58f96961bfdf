"""One HTTP request's prompts running in the AsyncEngine, and the admission rule in front of it.

A request starts in the engine as soon as it is admitted, not when its response is first read:
each prompt is pumped by a task of its own into one queue, so a batch of prompts comes back
interleaved in arrival order, and the queue bound counts a request from the moment it passes.
The bound counts sequences (prompts x n), what the engine schedules, so one batch request
cannot fill the queue on its own; a request is admitted whole or not at all.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sluice.engine.async_engine import AsyncEngine
from sluice.engine.output import RequestOutput
from sluice.engine.request import PreparedRequest
from sluice.sampling_params import InvalidParameterError
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
        self._started: defaultdict[int, set[int]] = defaultdict(set)  # samples with an output
        self._tasks = [
            asyncio.create_task(
                self._pump(index, engine.generate(f"{request_id}-{index}", request), metrics)
            )
            for index, request in enumerate(requests)
        ]

    @property
    def num_waiting(self) -> int:
        """Sequences (samples) in the engine that have not produced a token yet."""
        return sum(
            self._n - len(self._started[i]) for i, task in enumerate(self._tasks) if not task.done()
        )

    def cancel(self, reason: Exception | None = None) -> None:
        """Abort every prompt still running; AsyncEngine.generate frees its pages when cancelled.
        With a `reason`, the reader raises it instead of ending as if all were done."""
        if reason is not None and not all(task.done() for task in self._tasks):
            self._queue.put_nowait(reason)
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
        refused = False
        try:
            async for out in outputs:
                self._started[prompt].add(out.index)
                tracker.observe(out)
                self._queue.put_nowait(ChoiceOutput(prompt * self._n + out.index, prompt, out))
        except Exception as exc:  # the engine refused or failed this prompt: the reader raises it
            refused = isinstance(exc, InvalidParameterError)  # refused: nothing ran to be aborted
            self._queue.put_nowait(exc)
        finally:
            tracker.close(aborted=not refused)
            self._queue.put_nowait(_PROMPT_DONE)


class GenerationQueue:
    """Admits requests into the engine while at most `max_queue` sequences wait for their first
    token, and no request alone brings more than `max_sequences_per_request`."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: ServerMetrics,
        max_queue: int | None,
        max_sequences_per_request: int,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._max_queue = max_queue
        # A request larger than the queue could never be admitted: refuse it as too large.
        self._max_per_request = min(
            max_sequences_per_request, max_queue or max_sequences_per_request
        )
        self._live: weakref.WeakSet[Generation] = weakref.WeakSet()
        self._closed_with: APIError | None = None

    @property
    def num_waiting(self) -> int:
        return sum(generation.num_waiting for generation in self._live)

    def check_size(self, num_prompts: int, n: int) -> None:
        """InvalidParameterError (`prompt` or `n`) for a request too large to ever be admitted;
        cheap, so it runs before its prompts are tokenized."""
        if num_prompts * n <= self._max_per_request:
            return
        param = "prompt" if num_prompts > self._max_per_request else "n"
        raise InvalidParameterError(
            param,
            f"the request asks for {num_prompts} prompts x n={n} = {num_prompts * n} sequences; "
            f"this server takes at most {self._max_per_request} per request",
        )

    def start(self, request_id: str, requests: list[PreparedRequest]) -> Generation:
        """Raises APIError 503 when the engine is gone, the server is shutting down or the queue
        cannot take all of the request's sequences, before anything starts."""
        if not self._engine.is_alive:
            raise APIError(503, "the engine has stopped", code="engine_dead")
        if self._closed_with is not None:
            raise self._closed_with
        num_sequences = len(requests) * requests[0].params.n
        num_waiting = self.num_waiting
        if self._max_queue is not None and num_waiting + num_sequences > self._max_queue:
            raise APIError(
                503,
                f"the server is at capacity: {num_waiting} sequences are already waiting, this "
                f"request brings {num_sequences} and at most {self._max_queue} may wait",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        generation = Generation(self._engine, self._metrics, request_id, requests)
        self._live.add(generation)
        return generation

    def close(self, reason: APIError) -> None:
        """Refuse new requests with `reason` and end the running ones with it."""
        self._closed_with = reason
        for generation in list(self._live):
            generation.cancel(reason)
