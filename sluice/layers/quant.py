"""Weight-only quantized matmul that keeps GGUF weights compact in memory.

Every format here is stored as 4-bit codes c in 0..15 with one (scale, offset) pair per group of
inputs, W = c * scale + offset. Any weight that is an integer q times a per-group scale plus a
per-group offset maps onto it:

- 4-bit formats (Q4_0, Q4_1, Q4_K, `quantize(..., "int4")`) are one plane of codes;
- 5- and 8-bit formats (Q5_0, Q5_1, Q5_K, Q8_0, `quantize(..., "int8")`) split q = 16 * hi + lo into
  two planes laid side by side along the input axis, with x repeated once per plane, so one kernel
  call still computes the whole product.

Kernels and their layouts:

- "tiled" (`Int4TiledWeight`): sluice's own AVX512-VNNI kernel (kernels/int4_cpu.cpp), where the
  CPU has it. Scales and offsets are float16, so the legacy formats (whose d and m are float16)
  are exact; K-quant scales d * sc are rounded to float16.
- "avx2" (`Int4Avx2Weight`): sluice's own AVX2 kernel (kernels/int4_avx2_cpu.cpp) on x86 CPUs
  without VNNI: float32 activations and sums, float16 scales and offsets as "tiled".
- "int4pack" (`Int4PackedWeight`): PyTorch's `aten._weight_int4pack_mm_for_cpu` everywhere else
  (ARM, or where no C++ compiler builds sluice's kernels). It computes (c - 8) * scale + zero with bf16 scales and zeros, so those are rounded
  to bf16, an error of the size of the bf16 rounding of activations and outputs.
- "int4pack_cuda" (`Int4CudaPackedWeight`): the same arithmetic on NVIDIA GPUs
  (`aten._weight_int4pack_mm`, tensor cores, bf16 activations), codes in its own tiled layout.

sluice's kernel quantizes activations to int8 per group, in two passes for fp32 (to ~1e-5 of an
fp32 matmul) and in one for bf16 activations and ranking-only weights; int4pack rounds
activations and outputs to bf16. Q6_K (one scale per 16 weights, below the smallest group of 32)
and other types have no exact mapping; `from_gguf_blocks` returns None for them and the caller
dequantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import gguf
import numpy as np
import torch
from torch import Tensor

from sluice.kernels import int4_avx2_cpu, int4_cpu

QType = gguf.GGMLQuantizationType
Layout = Literal["tiled", "avx2", "int4pack", "int4pack_cuda"]

# Every GGUF format above has one scale and offset per 32 weights.
GGUF_GROUP_SIZE = 32
# The kernels take only these group sizes.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
# Both layouts want the number of output rows to be a multiple of 16.
_ROW_MULTIPLE = 16
# Packing goes through temporary copies of the codes; a multiple of 64 rows per chunk keeps the
# packed chunks concatenable (int4pack lays rows out in blocks of at most 64, tiled in 32).
_PACK_CHUNK_ROWS = 4096


class QuantizedWeight(torch.nn.Module):
    """A weight of shape [out_features, in_features] kept compressed; `matmul` computes x @ W.T."""

    out_features: int
    in_features: int

    def matmul(self, x: Tensor) -> Tensor:
        """[..., in_features] -> [..., out_features], in x's dtype."""
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """The weight as the kernel sees it, [out_features, in_features] float32."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Memory the weight occupies."""
        raise NotImplementedError


class _PlanarInt4Weight(QuantizedWeight):
    """W = sum over planes of code * scale + offset, planes side by side along the inputs.

    Built from codes [out, planes * in] (0..15) and float scales/offsets [out, planes * in / group];
    subclasses store them in their kernel's layout. CPU only.
    """

    def __init__(
        self, codes: Tensor, scales: Tensor, offsets: Tensor, in_features: int, group_size: int
    ) -> None:
        super().__init__()
        self.out_features = codes.shape[0]
        self.in_features = in_features
        self.planes = codes.shape[1] // in_features
        self.group_size = group_size
        # Whether the product only ranks (the head's 4-bit copy): sluice's kernel may then take
        # activations to int8 in one pass, whose error is far below the 4-bit weights'.
        self.ranking_only = False
        rows = -(-self.out_features // _ROW_MULTIPLE) * _ROW_MULTIPLE
        pad = rows - self.out_features
        # Padding rows get zero scales and offsets: weight 0, sliced off the output.
        self.padded = pad > 0
        self._store(
            torch.nn.functional.pad(codes, (0, 0, 0, pad)),
            torch.nn.functional.pad(scales.float(), (0, 0, 0, pad)),
            torch.nn.functional.pad(offsets.float(), (0, 0, 0, pad)),
        )

    def _store(self, codes: Tensor, scales: Tensor, offsets: Tensor) -> None:
        """Keep [padded out, planes * in] codes and [padded out, groups] scales and offsets as
        plain attributes, not buffers: Module.to(dtype) must not cast them."""
        raise NotImplementedError

    def _stored(self) -> tuple[Tensor, Tensor, Tensor]:
        """What `_store` was given: codes, scales and offsets as the kernel uses them, float32."""
        raise NotImplementedError

    def _storage(self) -> list[Tensor]:
        """The tensors the weight keeps."""
        raise NotImplementedError

    def _multiply(self, rows: Tensor) -> Tensor:
        """[M, planes * in] -> [M, padded out]."""
        raise NotImplementedError

    def _concatenate(self, parts: list[_PlanarInt4Weight]) -> None:
        """Make this weight's storage the row-wise concatenation of `parts`'."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"out_features={self.out_features}, in_features={self.in_features}, "
            f"planes={self.planes}, group_size={self.group_size}"
        )

    @staticmethod
    def stack_rows(parts: list[_PlanarInt4Weight]) -> _PlanarInt4Weight:
        """One weight from row slices packed separately (all but the last a multiple of
        `_PACK_CHUNK_ROWS` rows, so only the last one carries padding rows)."""
        whole = parts[0]
        if len(parts) == 1:
            return whole
        assert all(p.out_features % _PACK_CHUNK_ROWS == 0 for p in parts[:-1])
        whole._concatenate(parts)
        whole.out_features = sum(p.out_features for p in parts)
        whole.padded = parts[-1].padded
        return whole

    def matmul(self, x: Tensor) -> Tensor:
        # Decoding makes hundreds of these calls per token on tiny inputs, where each no-op
        # reshape or cast would cost about a microsecond next to a kernel of a few: skip them.
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        rows = rows.repeat(1, self.planes) if self.planes > 1 else rows.contiguous()
        out = self._multiply(rows)
        if self.padded:
            out = out[:, : self.out_features]
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage())

    def dequantize(self) -> Tensor:
        codes, scales, offsets = self._stored()
        # code * scale is exact in fp32: one rounding, as in the kernels' fused multiply-adds.
        per_plane = torch.addcmul(
            offsets.repeat_interleave(self.group_size, dim=1),
            codes,
            scales.repeat_interleave(self.group_size, dim=1),
        )
        per_plane = per_plane[: self.out_features].view(self.out_features, self.planes, -1)
        return per_plane.sum(dim=1)


class Int4TiledWeight(_PlanarInt4Weight):
    """The layout of sluice's AVX512-VNNI kernel (see kernels/int4_cpu.cpp): codes [tiles, in / 8,
    64] and float16 (scale, offset) [tiles, groups, 2, 16], both stored two tiles at a time."""

    def _store(self, codes: Tensor, scales: Tensor, offsets: Tensor) -> None:
        tiles, inputs = codes.shape[0] // int4_cpu.TILE_ROWS, codes.shape[1]
        chunks, run = inputs // int4_cpu.CHUNK_INPUTS, int4_cpu.CHUNK_INPUTS // 2
        # [tile, row, chunk, high, i] -> [tile, chunk, row, i, high]
        codes = codes.view(tiles, int4_cpu.TILE_ROWS, chunks, 2, run).permute(0, 2, 1, 4, 3)
        packed = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
        self.codes = _pairs_interleaved(packed.reshape(tiles, chunks, -1))
        scale_offset = torch.stack([scales, offsets], dim=-1).to(torch.float16)
        scale_offset = scale_offset.view(tiles, int4_cpu.TILE_ROWS, -1, 2).permute(0, 2, 3, 1)
        self.scale_offset = _pairs_interleaved(scale_offset)

    def _stored(self) -> tuple[Tensor, Tensor, Tensor]:
        packed = _pairs_deinterleaved(self.codes)
        tiles, chunks = packed.shape[:2]
        packed = packed.view(tiles, chunks, int4_cpu.TILE_ROWS, -1)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1)  # [.., i, high]
        codes = nibbles.permute(0, 2, 1, 4, 3).reshape(tiles * int4_cpu.TILE_ROWS, -1)
        scale_offset = _pairs_deinterleaved(self.scale_offset).permute(0, 3, 1, 2).float()
        scale_offset = scale_offset.reshape(tiles * int4_cpu.TILE_ROWS, -1, 2)
        return codes.float(), scale_offset[..., 0], scale_offset[..., 1]

    def _storage(self) -> list[Tensor]:
        return [self.codes, self.scale_offset]

    def _multiply(self, rows: Tensor) -> Tensor:
        if rows.dtype not in (torch.float32, torch.bfloat16):
            rows = rows.float()
        passes = 2 if rows.dtype == torch.float32 and not self.ranking_only else 1
        return int4_cpu.linear(rows, self.codes, self.scale_offset, self.group_size, passes)

    def _concatenate(self, parts: list[_PlanarInt4Weight]) -> None:
        self.codes = torch.cat([p.codes for p in parts])
        self.scale_offset = torch.cat([p.scale_offset for p in parts])


def _pairs_interleaved(per_tile: Tensor) -> Tensor:
    """[tiles, n, ...] -> the same, each pair of tiles stored n-major ([n, 2, ...]) so that a
    thread working on a pair reads one sequential stream; an odd last tile stays as it is."""
    paired = per_tile.shape[0] // 2 * 2
    pairs = per_tile[:paired].reshape(-1, 2, *per_tile.shape[1:]).transpose(1, 2)
    return torch.cat([pairs.reshape(per_tile[:paired].shape), per_tile[paired:]]).contiguous()


def _pairs_deinterleaved(stored: Tensor) -> Tensor:
    paired = stored.shape[0] // 2 * 2
    pairs = stored[:paired].reshape(-1, stored.shape[1], 2, *stored.shape[2:]).transpose(1, 2)
    return torch.cat([pairs.reshape(stored[:paired].shape), stored[paired:]])


class Int4Avx2Weight(_PlanarInt4Weight):
    """The layout of sluice's AVX2 kernel (see kernels/int4_avx2_cpu.cpp): codes [tiles, in, 8],
    byte j of an input holding rows j (low nibble) and 8 + j (high) of its tile, and float16
    (scale, offset) [tiles, groups, 2, 16]."""

    def _store(self, codes: Tensor, scales: Tensor, offsets: Tensor) -> None:
        tiles = codes.shape[0] // int4_avx2_cpu.TILE_ROWS
        per_input = codes.to(torch.uint8).view(tiles, int4_avx2_cpu.TILE_ROWS, -1).transpose(1, 2)
        self.codes = (per_input[..., :8] | (per_input[..., 8:] << 4)).contiguous()
        scale_offset = torch.stack([scales, offsets], dim=-1).to(torch.float16)
        scale_offset = scale_offset.view(tiles, int4_avx2_cpu.TILE_ROWS, -1, 2)
        self.scale_offset = scale_offset.permute(0, 2, 3, 1).contiguous()

    def _stored(self) -> tuple[Tensor, Tensor, Tensor]:
        per_input = torch.cat([self.codes & 15, self.codes >> 4], dim=-1)  # [tiles, in, 16]
        codes = per_input.transpose(1, 2).reshape(-1, per_input.shape[1])
        scale_offset = self.scale_offset.permute(0, 3, 1, 2).float()  # [tiles, 16, groups, 2]
        scale_offset = scale_offset.reshape(codes.shape[0], -1, 2)
        return codes.float(), scale_offset[..., 0], scale_offset[..., 1]

    def _storage(self) -> list[Tensor]:
        return [self.codes, self.scale_offset]

    def _multiply(self, rows: Tensor) -> Tensor:
        if rows.dtype != torch.float32:
            rows = rows.float()
        return int4_avx2_cpu.linear(rows, self.codes, self.scale_offset, self.group_size)

    def _concatenate(self, parts: list[_PlanarInt4Weight]) -> None:
        self.codes = torch.cat([p.codes for p in parts])
        self.scale_offset = torch.cat([p.scale_offset for p in parts])


class Int4PackedWeight(_PlanarInt4Weight):
    """PyTorch's CPU int4pack layout, multiplied by `aten._weight_int4pack_mm_for_cpu` with bf16
    (scale, zero = offset + 8 * scale) pairs."""

    def _store(self, codes: Tensor, scales: Tensor, offsets: Tensor) -> None:
        self.packed = _pack_codes(codes)
        self.scales_and_zeros = _scales_and_zeros(scales, offsets)

    def _stored(self) -> tuple[Tensor, Tensor, Tensor]:
        scales_and_zeros = self.scales_and_zeros.float().cpu()
        scales = scales_and_zeros[..., 0].T
        return self._centered_codes() + 8, scales, scales_and_zeros[..., 1].T - 8 * scales

    def _storage(self) -> list[Tensor]:
        return [self.packed, self.scales_and_zeros]

    def _multiply(self, rows: Tensor) -> Tensor:
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        return self._int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)

    @staticmethod
    def _int4pack_mm(rows: Tensor, packed: Tensor, group_size: int, scales: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows, packed, group_size, scales)

    def _concatenate(self, parts: list[_PlanarInt4Weight]) -> None:
        self.packed = torch.cat([p.packed for p in parts])
        self.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=1)

    def _centered_codes(self) -> Tensor:
        """code - 8 for every weight, [padded out, planes * in] float32.

        Read back through the kernel itself, whose packed layout depends on the CPU's vector width:
        with unit scales and zero zeros, multiplying the identity yields each centred code, exact
        in bf16.
        """
        width = self.planes * self.in_features
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1
        identity = torch.eye(width, dtype=torch.bfloat16, device=self.packed.device)
        codes = self._int4pack_mm(identity, self.packed, self.group_size, unit)
        return codes.T.float().cpu()


class Int4CudaPackedWeight(Int4PackedWeight):
    """PyTorch's CUDA int4pack layout (tensor-core tiles), multiplied by
    `aten._weight_int4pack_mm`; scales and zeros as on the CPU. Kept on the current CUDA device."""

    def _store(self, codes: Tensor, scales: Tensor, offsets: Tensor) -> None:
        self.scales_and_zeros = _scales_and_zeros(scales, offsets).cuda()
        tiles = cuda_inner_k_tiles(codes.shape[1])
        self.packed = torch._convert_weight_to_int4pack(nibble_pairs(codes).cuda(), tiles)

    @staticmethod
    def _int4pack_mm(rows: Tensor, packed: Tensor, group_size: int, scales: Tensor) -> Tensor:
        return torch._weight_int4pack_mm(rows, packed, group_size, scales)


def _scales_and_zeros(scales: Tensor, offsets: Tensor) -> Tensor:
    """[groups, out, 2] bf16 (scale, zero = offset + 8 * scale): int4pack's (c - 8) * s + z."""
    zeros = offsets + 8 * scales
    return torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16)


def nibble_pairs(codes: Tensor) -> Tensor:
    """[n, k] codes 0..15 -> [n, k / 2] uint8, each byte's high nibble the even input: what
    `aten._convert_weight_to_int4pack` takes on CUDA."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4) | codes[:, 1::2]


def cuda_inner_k_tiles(inputs: int) -> int:
    """The most 16-input tiles per packed row the CUDA kernel takes (8, 4 or 2) that divide the
    inputs evenly (it needs inputs to be a multiple of 16 * tiles)."""
    for tiles in (8, 4, 2):
        if inputs % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"the CUDA int4 kernel needs inputs a multiple of 32, got {inputs}")


def _weight_class(layout: Layout | None) -> type[_PlanarInt4Weight]:
    """The layout asked for, else sluice's fastest kernel where this CPU runs one."""
    if layout == "int4pack_cuda":
        return Int4CudaPackedWeight
    if layout is None:
        layout = _native_layout()
    if layout == "int4pack":
        return Int4PackedWeight
    if layout == "tiled" and int4_cpu.available():
        return Int4TiledWeight
    if layout == "avx2" and int4_avx2_cpu.available():
        return Int4Avx2Weight
    raise ValueError(f"layout {layout!r} is not one this CPU runs; expected 'int4pack'")


def _native_layout() -> Layout:
    if int4_cpu.available():
        return "tiled"
    return "avx2" if int4_avx2_cpu.available() else "int4pack"


def _pack_codes(codes: Tensor) -> Tensor:
    chunks = [
        # inner_k_tiles (the 2) only matters for the CUDA layout; the CPU packer ignores it.
        torch._convert_weight_to_int4pack_for_cpu(chunk.to(torch.int32).contiguous(), 2)
        for chunk in codes.split(_PACK_CHUNK_ROWS)
    ]
    return torch.cat(chunks)


def _from_affine_groups(
    q: Tensor, scale: Tensor, offset: Tensor, planes: int, group_size: int, layout: Layout | None
) -> _PlanarInt4Weight:
    """Pack W = q * scale + offset, with q [out, in] integers and scale/offset [out, in / group].

    One plane takes q in 0..15; two planes take q in -128..127 as 16 * (q >> 4) + (q & 15), the
    high plane with code (q >> 4) + 8, scale 16 * scale and offset -128 * scale, the low one with
    code q & 15.
    """
    weight_class = _weight_class(layout)
    q = q.to(torch.int16)
    if planes == 1:
        return weight_class(q.to(torch.uint8), scale, offset, q.shape[1], group_size)
    codes = torch.cat([((q >> 4) + 8).to(torch.uint8), (q & 15).to(torch.uint8)], dim=1)
    scales = torch.cat([16 * scale, scale], dim=1)
    offsets = torch.cat([-128 * scale, offset], dim=1)
    return weight_class(codes, scales, offsets, q.shape[1], group_size)


# --- GGUF blocks -----------------------------------------------------------------------------
# Each decoder maps raw blocks [n_blocks, type_size] to (q [n_blocks, block_size] integers,
# scale and offset [n_blocks, block_size / 32] float32) with weight = q * scale + offset.
_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 bytes [n, 2] -> float32 [n, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, run: int) -> np.ndarray:
    """Each `run` bytes hold `run` elements in their low nibbles, then `run` more in their high ones."""
    packed = packed.reshape(packed.shape[0], -1, 1, run)
    both = (packed >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    return both.reshape(packed.shape[0], -1).astype(np.int16)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: 32 little-endian bits, bit i is the 16s bit of element i."""
    return np.unpackbits(qh, axis=-1, bitorder="little").astype(np.int16) << 4


def _decode_q4_0(blocks: np.ndarray) -> _Decoded:
    d = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 2:], 16), d, -8 * d


def _decode_q4_1(blocks: np.ndarray) -> _Decoded:
    return _nibbles(blocks[:, 4:], 16), _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _decode_q5_0(blocks: np.ndarray) -> _Decoded:
    d = _f16(blocks[:, :2])
    return _nibbles(blocks[:, 6:], 16) | _fifth_bits(blocks[:, 2:6]), d, -16 * d


def _decode_q5_1(blocks: np.ndarray) -> _Decoded:
    q = _nibbles(blocks[:, 8:], 16) | _fifth_bits(blocks[:, 4:8])
    return q, _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _q8_0_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks [n, 34] -> int8 values [n, 32] and float32 scales [n, 1]."""
    return np.ascontiguousarray(blocks[:, 2:]).view(np.int8), _f16(blocks[:, :2])


def _decode_q8_0(blocks: np.ndarray) -> _Decoded:
    q, d = _q8_0_parts(blocks)
    return q.astype(np.int16), d, np.zeros_like(d)


def _k_quant_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-block header -> per-32 scale d * sc and offset -dmin * m, [n, 8]."""
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    return _f16(blocks[:, :2]) * sc, -_f16(blocks[:, 2:4]) * m


def _decode_q4_k(blocks: np.ndarray) -> _Decoded:
    return _nibbles(blocks[:, 16:], 32), *_k_quant_scales(blocks)


def _decode_q5_k(blocks: np.ndarray) -> _Decoded:
    # Bit j of qh byte i is the 16s bit of element i in sub-block j.
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (qh & np.uint8(1)).astype(np.int16).reshape(blocks.shape[0], -1) << 4
    return _nibbles(blocks[:, 48:], 32) | high, *_k_quant_scales(blocks)


# qtype -> (decoder, planes)
_GGUF_FORMATS: dict[QType, tuple[Callable[[np.ndarray], _Decoded], int]] = {
    QType.Q4_0: (_decode_q4_0, 1),
    QType.Q4_1: (_decode_q4_1, 1),
    QType.Q4_K: (_decode_q4_k, 1),
    QType.Q5_0: (_decode_q5_0, 2),
    QType.Q5_1: (_decode_q5_1, 2),
    QType.Q5_K: (_decode_q5_k, 2),
    QType.Q8_0: (_decode_q8_0, 2),
}


def from_gguf_blocks(
    qtype: QType,
    blocks: np.ndarray,
    shape: tuple[int, int],
    device: torch.device | str,
    layout: Layout | None = None,
) -> QuantizedWeight | None:
    """Wrap raw GGUF rows (uint8 [out, bytes_per_row]) of a weight of `shape` = (out, in), in
    `layout` (default: the fastest kernel this CPU runs).

    Returns None where there is no exact kernel for `qtype` on `device`; the caller then
    dequantizes with gguf.quants.dequantize.
    """
    device_type = torch.device(device).type
    if qtype not in _GGUF_FORMATS or device_type not in ("cpu", "cuda"):
        return None
    if device_type == "cuda":
        layout = "int4pack_cuda"
    _check_blocks(qtype, blocks, shape)
    out_features, in_features = shape
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    decode, planes = _GGUF_FORMATS[qtype]
    parts = []
    # A slice of rows at a time: decoding a whole embedding-sized matrix at once holds several
    # times its packed size in temporaries (int16 codes, uint8 planes, padding copies).
    for start in range(0, out_features, _PACK_CHUNK_ROWS):
        rows = blocks[start : start + _PACK_CHUNK_ROWS]
        q, scale, offset = decode(rows.reshape(-1, type_size))
        parts.append(
            _from_affine_groups(
                torch.from_numpy(q).reshape(len(rows), in_features),
                torch.from_numpy(scale).reshape(len(rows), -1),
                torch.from_numpy(offset).reshape(len(rows), -1),
                planes,
                GGUF_GROUP_SIZE,
                layout,
            )
        )
    return _PlanarInt4Weight.stack_rows(parts)


def q8_0_values_and_scales(blocks: np.ndarray, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Q8_0 rows (uint8 [out, bytes_per_row]) of a weight of `shape` -> int8 values [out, in] and
    float32 scales [out, in / 32], the weight being each value times its group's scale."""
    _check_blocks(QType.Q8_0, blocks, shape)
    values, scales = _q8_0_parts(blocks.reshape(-1, gguf.GGML_QUANT_SIZES[QType.Q8_0][1]))
    return torch.from_numpy(values).view(shape), torch.from_numpy(scales).view(shape[0], -1)


def _check_blocks(qtype: QType, blocks: np.ndarray, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    expected = (out_features, in_features // block_size * type_size)
    if in_features % block_size or tuple(blocks.shape) != expected:
        raise ValueError(
            f"{qtype.name} weight of shape {shape} needs blocks of shape {expected}, "
            f"got {tuple(blocks.shape)}"
        )


def quantize(
    weight: Tensor,
    mode: Literal["int8", "int4"],
    group_size: int = 32,
    layout: Layout | None = None,
) -> QuantizedWeight:
    """Quantize a full-precision [out, in] weight, one scale per `group_size` inputs.

    "int4": asymmetric min/max, codes 0..15 (0.625 bytes per weight at group 32).
    "int8": symmetric, q in -128..127, i.e. Q8_0-like (1.25 bytes per weight at group 32).
    """
    if weight.device.type != "cpu":
        raise NotImplementedError("quantized weights run on the CPU only; keep this one dense")
    return quantize_row_slices(weight.split(QUANTIZE_SLICE_ROWS), mode, group_size, layout)


# Rows per slice for `quantize_row_slices`.
QUANTIZE_SLICE_ROWS = _PACK_CHUNK_ROWS


def quantize_row_slices(
    slices: Iterable[Tensor],
    mode: Literal["int8", "int4"],
    group_size: int = 32,
    layout: Layout | None = None,
) -> QuantizedWeight:
    """`quantize` of the rows of `slices` stacked, holding one slice's temporaries at a time;
    every slice but the last has `QUANTIZE_SLICE_ROWS` rows."""
    return _PlanarInt4Weight.stack_rows(
        [_quantize_slice(rows, mode, group_size, layout) for rows in slices]
    )


def _quantize_slice(
    weight: Tensor, mode: Literal["int8", "int4"], group_size: int, layout: Layout | None
) -> _PlanarInt4Weight:
    out_features, in_features = weight.shape
    if group_size not in SUPPORTED_GROUP_SIZES or in_features % group_size:
        raise ValueError(
            f"group_size must be one of {SUPPORTED_GROUP_SIZES} and divide in_features "
            f"({in_features}), got {group_size}"
        )
    groups = weight.float().reshape(out_features, -1, group_size)
    if mode == "int4":
        q, scale, offset = _quantize_affine_uint4(groups)
        planes = 1
    elif mode == "int8":
        q, scale, offset = _quantize_symmetric_int8(groups)
        planes = 2
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; expected 'int8' or 'int4'")
    return _from_affine_groups(
        q.reshape(out_features, -1), scale, offset, planes, group_size, layout
    )


def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).float()


def _quantize_affine_uint4(groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    # Round scale and zero to bf16 first, so the codes are chosen for the values the kernel uses.
    scale = _bf16((high - low) / 15)
    zero = _bf16(low + 8 * scale)
    safe_scale = torch.where(scale == 0, 1.0, scale)
    q = torch.round((groups - zero[..., None]) / safe_scale[..., None]) + 8
    return q.clamp(0, 15), scale, zero - 8 * scale


def _quantize_symmetric_int8(groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scale = _bf16(groups.abs().amax(dim=-1) / 127)
    safe_scale = torch.where(scale == 0, 1.0, scale)
    q = torch.round(groups / safe_scale[..., None]).clamp(-128, 127)
    return q, scale, torch.zeros_like(scale)
