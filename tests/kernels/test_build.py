"""Building the C++ kernels on first use, and falling back to torch's where that cannot happen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sluice.kernels import int4_cpu
from sluice.layers.quant import Int4TiledWeight, quantize

# A fresh interpreter reports whether the kernel runs and which layout `quantize` chose.
PROBE = (
    "from sluice.kernels import int4_cpu; from sluice.layers.quant import quantize; import torch;"
    "print(int4_cpu.available(), type(quantize(torch.randn(16, 64), 'int4')).__name__)"
)


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
        pytest.skip("sluice's int4 kernel does not run on this machine")
    assert probe(tmp_path) == "True Int4TiledWeight"
    (library,) = tmp_path.rglob("int4_cpu-*.so")
    built = library.stat().st_mtime_ns
    assert probe(tmp_path) == "True Int4TiledWeight"
    assert library.stat().st_mtime_ns == built


def test_bad_operands_are_named() -> None:
    if not int4_cpu.available():
        pytest.skip("sluice's int4 kernel does not run on this machine")
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
