"""Qwen3-Next: a hybrid of Gated DeltaNet (linear attention) layers and gated full-attention
layers, per `config.layer_types`, each followed by a sparse MoE with a shared expert (or a dense
MLP where the config says so). All its RMSNorms are zero-centered, weight stored as offset from 1.

The full-attention layers are Llama's attention with an output gate and partial rotary; the
DeltaNet layers keep per-request state in slots of the state cache.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from sluice.config import LINEAR_ATTENTION, ModelConfig
from sluice.layers.forward_context import ForwardContext
from sluice.layers.gated_delta_net import GatedDeltaNet
from sluice.layers.moe import SparseMoE, is_sparse_layer
from sluice.layers.norm import ZeroCenteredRMSNorm
from sluice.layers.rotary import RotaryEmbedding
from sluice.models.base import CausalLM
from sluice.models.llama import LlamaAttention, LlamaMLP, rotary_embedding


class Qwen3NextDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps)
        # The token mixer's attribute name is the checkpoint's: linear_attn or self_attn.
        self.is_linear = config.layer_types[layer_index] == LINEAR_ATTENTION
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(
                config.linear_attention, config.hidden_size, eps, config.cache_index(layer_index)
            )
        else:
            self.self_attn = LlamaAttention(
                config, layer_index, rotary, qk_norm_type=ZeroCenteredRMSNorm, output_gate=True
            )
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps)
        if is_sparse_layer(config.moe, layer_index):
            self.mlp = SparseMoE(config.hidden_size, config.moe, partial(LlamaMLP, config))
        else:
            self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.linear_attn(h, ctx) if self.is_linear else self.self_attn(h, ctx))
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__(config)
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        rotary = rotary_embedding(config, inv_freq)
        self.layers = nn.ModuleList(
            Qwen3NextDecoderLayer(config, i, rotary) for i in range(config.num_layers)
        )
