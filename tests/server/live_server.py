"""A real `sluice serve` process, started the way users start it, and ways to talk to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL_NAME = "smollm2-135m-instruct"
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 180.0
# The test process and the servers share two cores: OpenMP threads that spin-wait for a core
# held by another process make each engine step ten times slower.
_SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120.0, **kwargs)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0
        )

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0
        )

    def metrics(self) -> dict[str, float]:
        """Samples by name, labelled ones as `name{label="value"}`."""
        with self.http() as http:  # with the key: `--auth-all-endpoints` may guard /metrics
            text = http.get("/metrics").text
        return {
            _sample_key(sample.name, sample.labels): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a service manager would send it; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def _sample_key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"


def start_server(log_path: Path, *args: str, api_key: str | None = None) -> ServerProcess:
    server = launch_server(log_path, *args, api_key=api_key)
    wait_until_healthy(server)
    return server


def launch_server(
    log_path: Path, *args: str, api_key: str | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    """Start `sluice serve` without waiting for it (to start several at once)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "sluice.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # No torch.compile: the compiled step has tests of its own, and compiling costs a minute.
    command += [
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory-gb",
        "0.25",
        "--no-compile",
    ]
    command += args
    if api_key:
        command += ["--api-key", api_key]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**_SERVER_ENV, **(env or {})}
        )
    return ServerProcess(process, port, log_path, api_key)


def wait_until_healthy(server: ServerProcess, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"sluice serve exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.stop()
    pytest.fail(f"sluice serve was not healthy after {timeout} s:\n{server.log_tail()}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
