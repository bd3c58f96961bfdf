"""Bamba: a Mamba2 hybrid. Most layers mix tokens with a Mamba2 SSM, a few with Llama attention
(rotary on half of each head); every layer then runs a SwiGLU feed-forward."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sluice.config import FULL_ATTENTION, ModelConfig
from sluice.layers.attention import AttentionMetadata
from sluice.layers.mamba2 import Mamba2Mixer
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import RotaryEmbedding
from sluice.layers.state import StateMetadata
from sluice.models.base import HybridCausalLM
from sluice.models.llama import LlamaAttention, LlamaMLP, rotary_embedding


class BambaDecoderLayer(nn.Module):
    """Either attention (`self_attn`) or Mamba2 (`mamba`) mixes tokens, as the checkpoint names."""

    def __init__(self, config: ModelConfig, layer_type: str, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: LlamaAttention | None = None
        self.mamba: Mamba2Mixer | None = None
        if layer_type == FULL_ATTENTION:
            self.self_attn = LlamaAttention(config, rotary)
        else:
            self.mamba = Mamba2Mixer(config.hidden_size, config.mamba, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, meta: AttentionMetadata, state: StateMetadata
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, meta) if self.mamba is None else self.mamba(h, state))
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class BambaForCausalLM(HybridCausalLM):
    CHECKPOINT_RENAMES: ClassVar[dict[str, str]] = {"norm": "final_layernorm"}

    def __init__(self, config: ModelConfig, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__(config)
        rotary = rotary_embedding(config, inv_freq)
        self.layers = nn.ModuleList(
            BambaDecoderLayer(config, layer_type, rotary) for layer_type in config.layer_types
        )
