"""sluice's GGUF header reader against the `gguf` package's: the same metadata and tensors, and
a clear error for what is not a GGUF file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from sluice.loaders.gguf_file import GGUFFormatError, read_gguf


def assert_reads_alike(path) -> None:
    theirs = gguf.GGUFReader(path)
    ours = read_gguf(path)
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == fields
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, their in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == their.tensor_type
        assert mine.shape == tuple(int(d) for d in their.shape)
        assert (mine.data_offset, mine.n_bytes) == (their.data_offset, their.n_bytes)
        assert np.array_equal(ours.read(mine), np.asarray(their.data).view(np.uint8).reshape(-1))


def test_the_default_model_reads_as_gguf_reads_it(default_gguf):
    assert_reads_alike(default_gguf)


def test_every_value_type_and_an_odd_alignment(tmp_path):
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_int32("t.i32", -(2**31))
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_string("t.str", "naïve ☃ \x00 end")
    writer.add_array("t.strs", ["a", "", "ü" * 300])
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("w.f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("w.f16", rng.standard_normal((7,)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_reads_alike(path)
    assert read_gguf(path).tensors[1].data_offset % 64 == 0


# Version 3, no tensors, one key-value pair.
HEADER_OF_ONE_KEY = (
    b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + b"\x01" + b"\x00" * 7
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"GGUF", "too short"),
        (b"GGML" + b"\x00" * 40, "no GGUF magic"),
        (b"GGUF\x01\x00\x00\x00" + b"\x00" * 40, "version 1"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x01" + b"\x00" * 7 + b"\xff" * 16, "past the"),
        (HEADER_OF_ONE_KEY + (2).to_bytes(8, "little") + b"\xff\xfe" + b"\x00" * 16, "not UTF-8"),
    ],
)
def test_what_is_not_a_gguf_header_is_named(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match=message):
        read_gguf(path)
