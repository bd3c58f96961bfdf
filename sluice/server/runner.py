"""Runs the app under uvicorn: on a socket bound before the model loads, with a shutdown that ends
every stream cleanly.

Binding first makes a busy port fail in a second, not after the model has loaded. On SIGTERM or
SIGINT uvicorn stops accepting and waits for in-flight responses; at `shutdown_timeout` we end the
generations that still run (a stream gets an error event and `[DONE]`, a waiting request a 503),
a moment before uvicorn would cancel their tasks and cut the connections mid-response.
"""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

from sluice.server.openai import OpenAIServer

# How long uvicorn waits past our own deadline for the ended responses to be written out.
_WRITE_OUT_S = 5.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; OSError (e.g. the port is in use) before anything is loaded."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address, family=family)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app_server: OpenAIServer = self.config.app.state.server
        ending = asyncio.create_task(app_server.shut_down_after(self._shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()


def serve(app: FastAPI, sock: socket.socket, log_level: str, shutdown_timeout: float) -> None:
    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout + _WRITE_OUT_S
    )
    _Server(config, shutdown_timeout).run(sockets=[sock])
