"""The short causal depthwise conv1d (+ SiLU) in front of Mamba2 and Gated DeltaNet mixers.

Its rolling state is the last `kernel - 1` inputs of the request, channels first
(`[channels, kernel - 1]`), so a chunk or a single decode token continues where the last left off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's chunk. x: [L, C]; weight: [C, K]; state: [C, K - 1].

    Returns silu(conv(x)) [L, C] and the new state [C, K - 1].
    """
    window = torch.cat((state.to(x.dtype), x.t()), dim=-1)  # [C, K - 1 + L]
    out = F.conv1d(window.unsqueeze(0), weight.unsqueeze(1), bias, groups=weight.shape[0])
    return F.silu(out[0].t()), window[:, -state.shape[-1] :]


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of B requests. x: [B, C]; state: [B, C, K - 1].

    Returns silu(conv(x)) [B, C] and the new states [B, C, K - 1].
    """
    window = torch.cat((state.to(x.dtype), x.unsqueeze(-1)), dim=-1)  # [B, C, K]
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out), window[..., 1:]
