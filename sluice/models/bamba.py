"""Bamba: a Mamba2 hybrid. Most layers mix tokens with a Mamba2 SSM, a few with Llama attention
(rotary on half of each head); every layer then runs a SwiGLU feed-forward."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sluice.config import FULL_ATTENTION, ModelConfig
from sluice.layers.forward_context import ForwardContext
from sluice.layers.mamba2 import Mamba2Mixer
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import RotaryEmbedding
from sluice.models.base import CausalLM
from sluice.models.llama import LlamaAttention, LlamaMLP, rotary_embedding


class BambaDecoderLayer(nn.Module):
    """Either attention (`self_attn`) or Mamba2 (`mamba`) mixes tokens, as the checkpoint names."""

    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: LlamaAttention | None = None
        self.mamba: Mamba2Mixer | None = None
        if config.layer_types[layer_index] == FULL_ATTENTION:
            self.self_attn = LlamaAttention(config, layer_index, rotary)
        else:
            self.mamba = Mamba2Mixer(
                config.hidden_size,
                config.mamba,
                config.rms_norm_eps,
                config.cache_index(layer_index),
            )
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = LlamaMLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, ctx) if self.mamba is None else self.mamba(h, ctx))
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class BambaForCausalLM(CausalLM):
    CHECKPOINT_RENAMES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: ModelConfig, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__(config)
        rotary = rotary_embedding(config, inv_freq)
        self.layers = nn.ModuleList(
            BambaDecoderLayer(config, i, rotary) for i in range(config.num_layers)
        )
