"""Rotary position embedding (rotate-half layout), with Llama 3 frequency scaling.

Partial rotary (Qwen3-Next, Bamba) rotates the first `rotary_dim` dims of each head and passes
the rest through unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sluice.config import RopeScaling


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, interpolated, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to flat [tokens, heads, head_dim] q and k at given positions."""

    def __init__(self, max_positions: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.rotary_dim = 2 * inv_freq.numel()
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._angles(positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions`, looked up once per step: every layer shares this module
        and gets the same positions tensor. A compiled step computes them in its graph."""
        if torch.compiler.is_compiling():
            return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        if self._step is None or self._step[0] is not positions:
            self._step = (
                positions,
                self.cos[positions].unsqueeze(1),
                self.sin[positions].unsqueeze(1),
            )
        return self._step[1], self._step[2]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == x.shape[-1]:
            return _rotate_half(x, cos, sin)
        rotary, passed = x.split([self.rotary_dim, x.shape[-1] - self.rotary_dim], dim=-1)
        return torch.cat((_rotate_half(rotary, cos, sin), passed), dim=-1)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)
