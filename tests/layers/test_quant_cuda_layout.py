"""The host side of the CUDA int4 layout, on the CPU: the nibble order
`aten._convert_weight_to_int4pack` takes (high nibble = even input, as gpt-fast and torchao
pack), read back by a plain reference, and the tile count it accepts."""

import pytest
import torch

from sluice.layers.quant import cuda_inner_k_tiles, nibble_pairs


def test_nibble_pairs_hold_every_code_in_order() -> None:
    codes = torch.randint(0, 16, (24, 96), generator=torch.Generator().manual_seed(0))
    packed = nibble_pairs(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 48)
    unpacked = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(24, 96)
    assert torch.equal(unpacked.long(), codes)


def test_inner_k_tiles_divide_the_inputs() -> None:
    assert cuda_inner_k_tiles(576) == 4  # SmolLM2-135M's hidden size: 576 = 36 * 16
    assert cuda_inner_k_tiles(1536) == 8
    assert cuda_inner_k_tiles(32 * 3) == 2
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda_inner_k_tiles(48)
