"""Server fixtures: one `sluice serve` process per session, shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default model behind default settings (a small KV pool and context, to start fast)."""
    process = start_server(
        tmp_path_factory.mktemp("server") / "serve.log", "--shutdown-timeout", "30"
    )
    yield process
    assert process.stop() == 0, process.log_tail()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as http:
        yield http


@pytest.fixture
def oai(server: ServerProcess) -> openai.OpenAI:
    return server.openai()
