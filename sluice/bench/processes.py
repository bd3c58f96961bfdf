"""Servers and routers for the benchmarks that measure a deployment, not one engine: real
`sluice serve` processes (each pinned to its own cores with `taskset`) and the routers from the
`vllm-router` / `sglang-router` wheels in front of them, on loopback.

Everything started here is stopped when the `Processes` context ends, also on an error: SIGTERM
to all, then a wait, then SIGKILL to what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def router_binary(name: str) -> str:
    """The wheels put their binaries beside this Python, which need not be on PATH."""
    return str(Path(sys.executable).parent / name)


@dataclass
class Process:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Processes:
    """Starts servers and routers, logging each to `log_dir/NAME.log`."""

    log_dir: Path
    started: list[Process] = field(default_factory=list)

    def __enter__(self) -> Processes:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def serve(self, name: str, cores: str, args: list[str], env: dict[str, str]) -> Process:
        """`sluice serve ARGS` on loopback, pinned to `cores` (taskset's list, e.g. "0")."""
        port = free_port()
        command = ["taskset", "-c", cores, sys.executable, "-m", "sluice.cli", "serve"]
        command += ["--host", "127.0.0.1", "--port", str(port), *args]
        return self._start(name, command, port, env)

    def router(self, name: str, binary: str, args: list[str]) -> Process:
        port = free_port()
        command = [router_binary(binary), *args, "--port", str(port)]
        command += ["--prometheus-port", str(free_port())]
        return self._start(name, command, port, {})

    def _start(self, name: str, command: list[str], port: int, env: dict[str, str]) -> Process:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        started = Process(name, process, port, log_path)
        self.started.append(started)
        return started

    def wait_healthy(self, processes: list[Process], timeout: float) -> None:
        """Until each answers `/health`; RuntimeError naming the one that exited or never did."""
        deadline = time.monotonic() + timeout
        for process in processes:
            while not _healthy(process):
                if process.process.poll() is not None:
                    raise RuntimeError(f"{process.name} exited; see {process.log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{process.name} did not start; see {process.log_path}")
                time.sleep(0.5)

    def stop_all(self) -> None:
        for process in reversed(self.started):  # routers first: they were started last
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.started:
            try:
                process.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.process.kill()
                process.process.wait()
        self.started.clear()


def _healthy(process: Process) -> bool:
    try:
        return httpx.get(f"{process.url}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False
