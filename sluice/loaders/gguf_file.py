"""The header of a GGUF file: its metadata and where each tensor's bytes lie.

The `gguf` package's reader builds a numpy view for every part of every field, some 250,000
of them for a vocabulary of 49,152 tokens and their merges: ~7 s for the default model, paid by
every start of a server, a benchmark or a tokenizer. This reads the same header with `struct`
straight from a memory map, in well under a second; tensors' bytes are not touched. The format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, versions 2 and 3).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF value types (GGUFValueType) -> struct format of one scalar.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF header this reader understands; the message says where."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: int  # a GGMLQuantizationType value
    shape: tuple[int, ...]  # as GGUF lists it: innermost dimension first
    data_offset: int  # of its first byte in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, object]  # scalars as Python values, arrays as lists
    tensors: list[GGUFTensorInfo]

    def read(self, tensor: GGUFTensorInfo) -> np.ndarray:
        """A tensor's bytes, as uint8."""
        return read_bytes(self.path, tensor.data_offset, tensor.n_bytes)


def read_bytes(path: Path, offset: int, count: int) -> np.ndarray:
    """`count` bytes of `path` from `offset`, read (not mapped: nothing stays resident)."""
    return np.fromfile(path, np.uint8, count=count, offset=offset)


def read_gguf(path: Path) -> GGUFFile:
    """Parse `path`'s header; GGUFFormatError if it is not a GGUF file or ends too soon."""
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size < 24:
            raise GGUFFormatError(f"{size} bytes is too short for a GGUF header")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _Header(buffer, size).parse(path)


class _Header:
    def __init__(self, buffer: mmap.mmap, size: int) -> None:
        self.buffer = buffer
        self.size = size
        self.offset = 0

    def parse(self, path: Path) -> GGUFFile:
        if self.buffer[:4] != _MAGIC:
            raise GGUFFormatError(f"no GGUF magic (starts with {bytes(self.buffer[:4])!r})")
        self.offset = 4
        version = self.scalar("I")
        if version not in _VERSIONS:
            raise GGUFFormatError(f"version {version} (readable: {_VERSIONS}; big-endian: no)")
        tensor_count, kv_count = self.scalar("Q"), self.scalar("Q")
        metadata = {}
        for _ in range(kv_count):
            key = self.string()
            metadata[key] = self.value(self.scalar("I"))
        infos = [self.tensor_info() for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self.offset // alignment) * alignment
        tensors = [self.located(info, data_start) for info in infos]
        return GGUFFile(path, metadata, tensors)

    def take(self, count: int) -> int:
        """Advance over `count` bytes; the offset they start at."""
        start = self.offset
        if count < 0 or start + count > self.size:
            raise GGUFFormatError(f"the header runs past the end of the file at byte {start}")
        self.offset += count
        return start

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack_from("<" + fmt, self.buffer, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        start = self.take(length)
        try:
            return self.buffer[start : start + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"the string at byte {start} is not UTF-8: {exc}") from exc

    def value(self, value_type: int) -> object:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise GGUFFormatError(f"unknown value type {value_type} at byte {self.offset - 4}")

    def array(self) -> list:
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALARS:  # numbers in one read
            fmt = _SCALARS[item_type]
            start = self.take(count * struct.calcsize(fmt))
            return list(struct.unpack_from(f"<{count}{fmt}", self.buffer, start))
        return [self.value(item_type) for _ in range(count)]

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        dims = self.scalar("I")
        start = self.take(8 * dims)
        shape = struct.unpack_from(f"<{dims}Q", self.buffer, start)
        return name, shape, self.scalar("I"), self.scalar("Q")

    def located(
        self, info: tuple[str, tuple[int, ...], int, int], data_start: int
    ) -> GGUFTensorInfo:
        name, shape, tensor_type, offset = info
        try:
            block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
        except (ValueError, KeyError) as exc:
            raise GGUFFormatError(f"tensor {name} has unknown type {tensor_type}") from exc
        n_bytes = math.prod(shape) // block_size * block_bytes
        tensor = GGUFTensorInfo(name, tensor_type, tuple(shape), data_start + offset, n_bytes)
        if tensor.data_offset + n_bytes > self.size:
            raise GGUFFormatError(f"tensor {name} runs past the end of the file")
        return tensor
