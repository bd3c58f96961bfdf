"""2:4 sparse weights kept as 4-bit codes: two of every four inputs of a row, each with a 4-bit
code and a 2-bit position, and one float16 (scale, offset) per group of inputs; rows stored in
pairs, eight inputs at a time (kernels/sparse24_int4_cpu.cpp runs them).

A checkpoint carries no mask: a linear layer whose every group of four inputs holds at most two
non-zeros is exactly 2:4, and is detected as such at load. `quantize_kept` is the one 4-bit
quantizer of kept values; `sluice compress` writes its dequantized output, which quantizes back
onto itself at load.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.kernels import sparse24_int4_cpu
from sluice.layers.quant import QuantizedWeight

GROUP = 4
KEPT = 2
# Inputs per stored block of the kernel (eight kept values: four of each row of a pair).
BLOCK_INPUTS = 8
PAIR = 2
DEFAULT_GROUP_SIZE = 32


def is_two_of_four(weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    """Whether every group of four inputs of every row holds at most two non-zeros, in a shape
    the kernel takes."""
    if weight.dim() != 2 or weight.shape[1] % group_size or group_size % 16:
        return False
    nonzeros = (weight.reshape(weight.shape[0], -1, GROUP) != 0).sum(dim=-1)
    return bool((nonzeros <= KEPT).all())


def kept_positions(weight: Tensor) -> Tensor:
    """[out, in / 4, 2] int64: the positions kept in each group of four, ascending: its
    non-zeros, completed by zeros (first ones first) where it has fewer than two."""
    groups = weight.reshape(weight.shape[0], -1, GROUP)
    # Non-zeros first, then earlier positions first: a unique, stable choice.
    rank = (groups != 0).float() * GROUP - torch.arange(GROUP, dtype=torch.float32)
    return rank.topk(KEPT, dim=-1).indices.sort(dim=-1).values


def quantize_kept(kept: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Kept values [out, in / 2] -> codes 0..15 (float), scale and offset [out, in / group_size]
    float16-exact, value ~ code * scale + offset (min/max per group of `group_size` inputs,
    i.e. of `group_size / 2` kept values)."""
    groups = kept.float().reshape(kept.shape[0], -1, group_size // KEPT)
    low = groups.amin(dim=-1).half().float()
    scale = ((groups.amax(dim=-1) - low) / 15).half().float()
    safe_scale = torch.where(scale == 0, 1.0, scale)
    codes = torch.round((groups - low[..., None]) / safe_scale[..., None]).clamp(0, 15)
    return codes.reshape(kept.shape), scale, low


def dequantize_kept(codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> Tensor:
    per_value = group_size // KEPT
    return torch.addcmul(
        offset.repeat_interleave(per_value, dim=1), codes, scale.repeat_interleave(per_value, dim=1)
    )


def quantize_two_of_four(weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Tensor:
    """The 2:4 int4 weight as it will run, float32: its kept values quantized, the rest zero."""
    positions = kept_positions(weight)
    kept = _gather_kept(weight, positions)
    values = dequantize_kept(*quantize_kept(kept, group_size), group_size)
    return _scatter_kept(values, positions, weight.shape)


def _gather_kept(weight: Tensor, positions: Tensor) -> Tensor:
    groups = weight.float().reshape(weight.shape[0], -1, GROUP)
    return groups.gather(-1, positions).reshape(weight.shape[0], -1)


def _scatter_kept(values: Tensor, positions: Tensor, shape: torch.Size) -> Tensor:
    dense = torch.zeros(shape[0], shape[1] // GROUP, GROUP)
    dense.scatter_(-1, positions, values.reshape(shape[0], -1, KEPT))
    return dense.reshape(shape)


class Sparse24Int4Weight(QuantizedWeight):
    """A 2:4 weight in the kernel's layout, rows in pairs (a zero row completes an odd count):
    codes [pairs, in / 2] and positions [pairs, in / 4] uint8, (scale, offset) of each row
    [pairs, in / group_size, 2, 2] float16. CPU only (AVX2)."""

    def __init__(self, weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        super().__init__()
        if not sparse24_int4_cpu.available():
            raise RuntimeError("the 2:4 int4 kernel does not run on this CPU (it needs AVX2)")
        if not is_two_of_four(weight, group_size):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} is not 2:4 sparse in groups of "
                f"{group_size} inputs (a multiple of {BLOCK_INPUTS})"
            )
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        weight = torch.nn.functional.pad(weight.float(), (0, 0, 0, self.out_features % PAIR))
        positions = kept_positions(weight)
        codes, scale, offset = quantize_kept(_gather_kept(weight, positions), group_size)
        self.codes = _packed(_pair_blocks(codes), bits=4)
        self.index = _packed(_pair_blocks(positions.reshape(weight.shape[0], -1)), bits=2)
        scale_offset = torch.stack([scale, offset], dim=-1).half()  # [rows, groups, 2]
        self.scale_offset = scale_offset.view(-1, PAIR, *scale_offset.shape[1:]).transpose(1, 2)
        self.scale_offset = self.scale_offset.contiguous()

    def matmul(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        out = sparse24_int4_cpu.linear(
            rows, self.codes, self.index, self.scale_offset, self.group_size, self.out_features
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> Tensor:
        return sparse24_int4_cpu.dequantize(
            self.codes, self.index, self.scale_offset, self.group_size, self.out_features
        )

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.codes, self.index, self.scale_offset)
        )

    def extra_repr(self) -> str:
        return (
            f"out_features={self.out_features}, in_features={self.in_features}, "
            f"group_size={self.group_size}, sparsity=2:4"
        )


def _pair_blocks(kept: Tensor) -> Tensor:
    """Per-row kept fields [rows, in / 2] -> [pairs, in / 2 * 2]: per block of eight inputs, the
    first row's four fields, then the second's."""
    per_block = BLOCK_INPUTS // GROUP * KEPT
    blocks = kept.reshape(-1, PAIR, kept.shape[1] // per_block, per_block)
    return blocks.transpose(1, 2).reshape(blocks.shape[0], -1)


def _packed(fields: Tensor, bits: int) -> Tensor:
    """[out, n] small integers -> uint8 [out, n * bits / 8]: each block's eight fields in one
    little-endian word, field j at bits j * bits."""
    per_word = 8
    words = fields.reshape(fields.shape[0], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    word = (words.to(torch.int64) << shifts).sum(dim=-1)
    word_bytes = word.contiguous().view(torch.uint8).reshape(fields.shape[0], -1, 8)
    return word_bytes[..., : per_word * bits // 8].reshape(fields.shape[0], -1).contiguous()
