"""Runs the engine in a thread of its own and hands each request's outputs to asyncio callers.

The event loop never waits on a model step: callers submit commands through a thread-safe
queue, the engine thread steps while there is work, and each output is posted back into the
caller's asyncio.Queue with `call_soon_threadsafe`.

The engine thread also builds the engine (loading, compiling), so that every parallel torch op
of a server runs on that one thread. OpenMP (libgomp) keeps a pool of worker threads for each
thread that starts parallel regions; with more pooled threads than cores it cuts its spin-wait
short, and every parallel region then pays for waking its workers: a model loaded on the main
thread and stepped on this one ran its steps 25-30% slower on two cores.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sluice.engine.engine import Engine
from sluice.engine.output import RequestOutput
from sluice.engine.request import PreparedRequest
from sluice.memory import share_malloc_arenas

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class EngineStepError(RuntimeError):
    """A model step failed; the requests in flight were aborted and the engine carries on."""


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue  # RequestOutput items, or an Exception that ends the stream
    remaining: int  # samples not yet finished

    def post(self, item: RequestOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        """Builds the engine with `make_engine` on the engine thread; returns once it is built,
        raising what building it raised."""
        self.engine: Engine  # set on the engine thread before __init__ returns
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._subscribers: dict[str, _Subscriber] = {}
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        built = threading.Event()
        share_malloc_arenas()  # the engine thread loads the model
        self._thread = threading.Thread(
            target=self._run, args=(make_engine, built), name="sluice-engine", daemon=True
        )
        self._thread.start()
        built.wait()
        if self._error is not None:
            raise self._error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self, request_id: str, request: PreparedRequest
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a request prepared (validated) by `engine.prepare`."""
        self._check_alive()
        subscriber = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(), request.params.n)
        self._subscribers[request_id] = subscriber
        self._commands.put(lambda: self._add(request_id, request))
        try:
            while subscriber.remaining:
                item = await subscriber.outputs.get()
                if isinstance(item, Exception):
                    raise item
                subscriber.remaining -= item.finished
                yield item
        finally:
            if subscriber.remaining:  # the caller went away (disconnect, cancel): free its pages
                self.abort(request_id)
            self._subscribers.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self._deliver(self.engine.abort_request(request_id)))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(lambda: None)  # wake the thread if it waits for work
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        """False once the engine thread has failed or been shut down."""
        return self._error is None and self._thread.is_alive()

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._error!r}")

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self, make_engine: Callable[[], Engine], built: threading.Event) -> None:
        try:
            self.engine = make_engine()
        except BaseException as exc:
            self._error = exc
            return
        finally:
            built.set()
        try:
            while not self._stopping.is_set():
                # Leases and transfers in flight need the loop even with no request to step.
                poll = self.engine.idle_poll_seconds
                self._drain_commands(not self.engine.has_unfinished_requests(), poll)
                if self.engine.has_unfinished_requests() or poll is not None:
                    self._step()
        except BaseException as exc:  # the loop itself broke: fail every caller, never hang them
            logger.exception("engine thread failed")
            self._error = exc
            for subscriber in list(self._subscribers.values()):
                subscriber.post(EngineDeadError(f"the engine failed: {exc!r}"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # A step's failure is a bug we cannot pin on one request: abort all that were in
            # flight (their pages come back) and keep serving the requests that come next.
            logger.exception("engine step failed; aborting the requests in flight")
            for request_id in self.engine.abort_all_requests():
                subscriber = self._subscribers.get(request_id)
                if subscriber is not None:
                    subscriber.post(EngineStepError(f"the engine step failed: {exc!r}"))
            return
        self._deliver(outputs)

    def _drain_commands(self, block: bool, timeout: float | None = None) -> None:
        try:
            command = self._commands.get(block=block, timeout=timeout)
            while True:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _add(self, request_id: str, request: PreparedRequest) -> None:
        try:
            self._deliver(self.engine.add_request(request_id, request))
        except Exception as exc:  # e.g. a duplicate id: that caller's error, not the engine's
            subscriber = self._subscribers.get(request_id)
            if subscriber is not None:
                subscriber.post(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            subscriber = self._subscribers.get(out.request_id)
            if subscriber is not None:
                subscriber.post(out.error or out)
