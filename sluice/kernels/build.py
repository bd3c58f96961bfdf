"""Compile and load sluice's C++ kernels on first use, once per machine.

Like inductor's kernels they are compiled for the CPU they run on (-march=native), so each uses
every vector extension that CPU has. The shared library is cached under
$SLUICE_CACHE_DIR (default ~/.cache/sluice) by a hash of the source, the compile command, the
torch version and the CPU's feature flags; it registers its operators with torch's dispatcher
(`torch.ops.sluice.*`), so eager code and torch.compile graphs call it alike.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).parent
_BUILD_TIMEOUT_S = 300
# Libraries being built are named so; one older than a build may take was left by a build that was
# killed (SIGKILL, a power cut: no `finally` ran) and is swept by the next build.
_PARTIAL_SUFFIX = ".so.partial"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sluice"
    return Path(os.environ.get("SLUICE_CACHE_DIR", default)) / "kernels"


def load_operators(
    name: str, cpu_supported: bool, fallback: str, shapes: dict[str, Callable[..., Tensor]]
) -> bool:
    """Load `<name>.cpp` where the CPU has the instructions it needs, and register the shape
    function of each of its operators (by name) for torch.compile; False, with `fallback` (what
    runs instead) logged, where it does not run."""
    if not cpu_supported:
        logger.info("this CPU lacks the instructions of sluice's %s kernels: %s", name, fallback)
        return False
    if not load(name):
        return False
    for operator, shape in shapes.items():
        torch.library.register_fake(f"sluice::{operator}")(shape)
    return True


@functools.cache
def load(name: str) -> bool:
    """Build (if not cached) and load `<name>.cpp`; False, with the reason logged, on failure or
    where SLUICE_NATIVE_KERNELS=0 turns sluice's kernels off."""
    if os.environ.get("SLUICE_NATIVE_KERNELS", "1") == "0":
        logger.info("SLUICE_NATIVE_KERNELS=0: torch's kernels run instead of sluice's %s", name)
        return False
    source = _SOURCES / f"{name}.cpp"
    command = _compile_command(source, Path("OUT"))
    parts = [source.read_bytes(), " ".join(command).encode(), torch.__version__.encode()]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_flags()])).hexdigest()[:16]
    library = cache_dir() / f"{name}-{key}.so"
    try:
        if not library.exists():
            _build(source, library)
        torch.ops.load_library(str(library))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        logger.warning("could not build the %s kernels, using torch's instead: %s", name, error)
        return False
    return True


def _build(source: Path, library: Path) -> None:
    logger.info("compiling the %s kernels for this CPU (once, about 10 s)", source.stem)
    start = time.perf_counter()
    library.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partial_builds(library.parent)
    # Build under a temporary name and rename: processes starting together never load half a file.
    fd, temporary = tempfile.mkstemp(
        prefix=f"{library.stem}-", suffix=_PARTIAL_SUFFIX, dir=library.parent
    )
    os.close(fd)
    try:
        done = subprocess.run(
            _compile_command(source, Path(temporary)),
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"compiler exited with {done.returncode}: {done.stderr[-2000:]}")
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("compiled %s in %.1f s", library.name, time.perf_counter() - start)


def _sweep_partial_builds(folder: Path) -> None:
    stale_before = time.time() - 2 * _BUILD_TIMEOUT_S  # a live build has finished by then
    for partial in folder.glob(f"*{_PARTIAL_SUFFIX}"):
        try:
            if partial.stat().st_mtime < stale_before:
                partial.unlink()
        except FileNotFoundError:  # another process swept it first
            pass


def _compile_command(source: Path, output: Path) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        os.environ.get("CXX", "c++"),
        *("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        str(source),
        "-o",
        str(output),
        *(f"-L{path}" for path in cpp_extension.library_paths()),
        "-lc10",
        "-ltorch_cpu",
    ]


def _cpu_flags() -> bytes:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
