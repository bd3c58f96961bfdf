"""The Llama family (Llama 2/3, Mistral, SmolLM2) and Qwen3, which adds per-head q/k RMSNorm.

Hybrid models reuse the attention (with an output gate, Qwen3-Next), the MLP and the rotary setup.
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.config import ModelConfig
from sluice.layers.activation import silu_and_mul
from sluice.layers.attention import PagedAttention
from sluice.layers.forward_context import ForwardContext
from sluice.layers.linear import Linear
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import RotaryEmbedding, inverse_frequencies
from sluice.models.base import CausalLM


class LlamaAttention(nn.Module):
    """With `output_gate`, q_proj yields a query and a gate per head (interleaved per head, as
    Qwen3-Next stores them) and the attention output is scaled by sigmoid(gate). `layer_index`:
    the decoder layer's index in the model."""

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        rotary: RotaryEmbedding,
        qk_norm_type: type[nn.Module] = RMSNorm,
        output_gate: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.output_gate = output_gate
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q_rows = 2 * q_size if output_gate else q_size
        self.split_sizes = [q_rows, kv_size, kv_size]
        self.qkv_proj = Linear(config.hidden_size, q_rows + 2 * kv_size)
        self.o_proj = Linear(q_size, config.hidden_size)
        self.q_norm = qk_norm_type(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = qk_norm_type(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(
            config.cache_index(layer_index), self.num_heads, self.num_kv_heads, self.head_dim
        )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q, gate = self._query_and_gate(q)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(ctx.attn.positions, q, k)
        out = self.attn(q, k, v, ctx)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def _query_and_gate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.output_gate:
            return q.view(-1, self.num_heads, self.head_dim), None
        q, gate = q.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        return q, gate.reshape(-1, self.num_heads * self.head_dim)


class LlamaMLP(nn.Module):
    """SwiGLU MLP; `intermediate_size` overrides the config's (MoE experts are narrower).
    `layer_index` (a decoder layer's MLP): its steps of decodes run sparse where the forward
    context carries activation sparsity (sparse/decoding.py)."""

    def __init__(
        self,
        config: ModelConfig,
        intermediate_size: int | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, config.hidden_size)
        self.layer_index = layer_index

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        if self._runs_sparse(ctx):
            return ctx.sparse.mlp(self.layer_index, x)
        return self.dense(x)

    def _runs_sparse(self, ctx: ForwardContext | None) -> bool:
        if ctx is None or ctx.sparse is None or self.layer_index is None:
            return False
        return ctx.decodes_only or ctx.sparse.all_rows

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, layer_index=layer_index)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__(config)
        rotary = rotary_embedding(config, inv_freq)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary) for i in range(config.num_layers)
        )


def rotary_embedding(config: ModelConfig, inv_freq: torch.Tensor | None) -> RotaryEmbedding:
    """One table shared by all layers; `inv_freq` comes from a loader that knows better (GGUF)."""
    if inv_freq is None:
        inv_freq = inverse_frequencies(config.rotary_dim, config.rope_theta, config.rope_scaling)
    return RotaryEmbedding(config.max_position_embeddings, inv_freq)
