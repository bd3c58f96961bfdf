from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sluice.api import LLM
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.loaders.gguf_file import read_gguf
from sluice.loaders.model_path import resolve_model
from sluice.loaders.tokenizer import Tokenizer
from sluice.models.registry import LoadedModel, load_model

sys.path.insert(0, str(Path(__file__).parent))  # tests share model_harness.py

from model_harness import assert_no_leaks


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Workers (`make test` runs two) share the cores: one thread each, and for the servers
        # and benches they start, or OpenMP threads spin-waiting for a core the other worker
        # holds make every step many times slower.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@contextlib.contextmanager
def one_compile_at_a_time() -> Iterator[None]:
    """Engines start (and compile the shared model's graphs, minutes cold) one test process at a
    time: the second process to need the graphs then finds them in inductor's on-disk cache and
    loads them in seconds, rather than compiling them again beside the first."""
    with open(Path(tempfile.gettempdir()) / "sluice-tests-compile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF."""
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm(default_gguf: Path) -> Tokenizer:
    """The default model's tokenizer, built from its GGUF once per test run."""
    return Tokenizer.from_gguf(read_gguf(default_gguf))


@pytest.fixture(scope="session")
def default_model(default_gguf) -> LoadedModel:
    """The fp32 reference path, loaded once per session; engines built on it share it, each with
    caches of its own."""
    return load_model(default_gguf, torch.device("cpu"), torch.float32, quantization="none")


@pytest.fixture
def make_llm(default_model):
    """Build LLMs over the shared default model; after the test, every page must be free."""
    engines: list[Engine] = []

    def make(**options) -> LLM:
        config = EngineConfig.create(quantization="none", **options)
        with one_compile_at_a_time() if config.compile else contextlib.nullcontext():
            engine = Engine(config, loaded=default_model)
        engines.append(engine)
        return LLM.from_engine(engine)

    yield make
    for engine in engines:
        assert_no_leaks(engine)
