"""Building the C++ kernels on first use, and falling back to torch's where that cannot happen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sluice.kernels import int4_cpu
from sluice.layers.quant import Int4TiledWeight, quantize

# A fresh interpreter reports whether the kernel runs and which layout `quantize` chose.
PROBE = (
    "from sluice.kernels import int4_cpu; from sluice.layers.quant import quantize; import torch;"
    "print(int4_cpu.available(), type(quantize(torch.randn(16, 64), 'int4')).__name__)"
)


# A fresh interpreter builds (or finds) one kernel library, one whose CPU needs every machine meets.
BUILD = "from sluice.kernels import build; print(build.load('topk_cpu'))"


def probe(tmp_path, **env: str) -> str:
    environment = {**os.environ, "SLUICE_CACHE_DIR": str(tmp_path), **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_a_compiler_int4_weights_use_torchs_kernel(tmp_path) -> None:
    assert probe(tmp_path, CXX="/nonexistent/c++") == "False Int4PackedWeight"
    assert not list(tmp_path.rglob("*.so"))


def test_the_switch_turns_the_native_kernel_off(tmp_path) -> None:
    assert probe(tmp_path, SLUICE_NATIVE_KERNELS="0") == "False Int4PackedWeight"


def test_a_build_is_cached_and_reused(tmp_path) -> None:
    if not int4_cpu.available():
        pytest.skip(reason="sluice's int4 kernel does not run on this machine")
    assert probe(tmp_path) == "True Int4TiledWeight"
    (library,) = tmp_path.rglob("int4_cpu-*.so")
    built = library.stat().st_mtime_ns
    assert probe(tmp_path) == "True Int4TiledWeight"
    assert library.stat().st_mtime_ns == built


def test_bad_operands_are_named() -> None:
    if not int4_cpu.available():
        pytest.skip(reason="sluice's int4 kernel does not run on this machine")
    weight = quantize(torch.randn(32, 64), "int4", layout="tiled")
    assert isinstance(weight, Int4TiledWeight)
    with pytest.raises(RuntimeError, match="96 inputs do not fit"):
        int4_cpu.linear(torch.randn(2, 96), weight.codes, weight.scale_offset, 32, 2)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        int4_cpu.linear(torch.randn(2, 64).half(), weight.codes, weight.scale_offset, 32, 2)
    with pytest.raises(RuntimeError, match="passes must be 1 or 2, got 3"):
        int4_cpu.linear(torch.randn(2, 64), weight.codes, weight.scale_offset, 32, 3)
    with pytest.raises(ValueError, match="layout 'packed'"):
        quantize(torch.randn(32, 64), "int4", layout="packed")  # type: ignore[arg-type]


def partial_builds(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.so.partial"))


def test_a_build_interrupted_midway_leaves_no_partial_library(tmp_path) -> None:
    # A "compiler" that takes its time: the build is interrupted while it runs.
    compiler = tmp_path / "slow-c++"
    compiler.write_text("#!/bin/sh\nsleep 60\n")
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    environment = {**os.environ, "SLUICE_CACHE_DIR": str(cache), "CXX": str(compiler)}
    process = subprocess.Popen([sys.executable, "-c", BUILD], env=environment)
    deadline = time.monotonic() + 120
    while not partial_builds(cache) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert partial_builds(cache), "the build never started"
    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(timeout=60) != 0
    assert partial_builds(cache) == [] and not list(cache.rglob("*.so"))


def test_the_next_build_sweeps_what_a_killed_build_left(tmp_path) -> None:
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    stale = kernels / "int4_cpu-0123456789abcdef-killed.so.partial"  # SIGKILL: no cleanup ran
    fresh = kernels / "int4_cpu-0123456789abcdef-running.so.partial"  # another build, running
    for partial in (stale, fresh):
        partial.write_bytes(b"half a library")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    environment = {**os.environ, "SLUICE_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/c++"}
    done = subprocess.run([sys.executable, "-c", BUILD], env=environment, timeout=300)
    assert done.returncode == 0
    assert partial_builds(tmp_path) == [fresh]
