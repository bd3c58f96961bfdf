"""The Llama family (Llama 2/3, Mistral, SmolLM2) and Qwen3, which adds per-head q/k RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from sluice.config import ModelConfig
from sluice.layers.activation import silu_and_mul
from sluice.layers.attention import AttentionMetadata, PagedAttention
from sluice.layers.linear import Linear, Quantization
from sluice.layers.logits import shortlisted_logits
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import RotaryEmbedding, inverse_frequencies
from sluice.loaders.weights import WeightSource, concat_rows, to_dense

# Checkpoint projections that we run as one fused matmul: fused name -> its parts, in order.
FUSED_PROJECTIONS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size)
        self.o_proj = Linear(q_size, config.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(meta.positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, inv_freq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        if inv_freq is None:
            inv_freq = inverse_frequencies(
                config.rotary_dim, config.rope_theta, config.rope_scaling
            )
        rotary = RotaryEmbedding(config.max_position_embeddings, inv_freq)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)  # dense, exact
        # A quantized copy that ranks the vocabulary; None when the head runs dense alone.
        self.quantized_head: Linear | None = Linear(config.hidden_size, config.vocab_size)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Flat tokens of all scheduled requests in, final hidden states out."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized_head is None:
            return self.lm_head(hidden).float()
        return shortlisted_logits(hidden, self.quantized_head, self.lm_head.weight)

    def load_weights(
        self,
        weights: dict[str, WeightSource],
        dtype: torch.dtype,
        quantization: Quantization = "none",
    ) -> None:
        """Fill every parameter from HF-named checkpoint tensors; a missing one is an error."""
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in weights
        heads = (self.lm_head, self.quantized_head)
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module not in heads:
                module.load(_linear_source(weights, _checkpoint_name(name)), dtype, quantization)
        for name, param in self.named_parameters():
            if not _is_linear_param(self, name):
                _copy_into(param, to_dense(_take(weights, _checkpoint_name(name))), name)
        self.to(dtype=dtype)
        head = _take(weights, "model.embed_tokens.weight" if tied else "lm_head.weight")
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.load(head, dtype, "none")
        self._load_quantized_head(head, dtype, quantization)

    def _load_quantized_head(
        self, head: WeightSource, dtype: torch.dtype, quantization: Quantization
    ) -> None:
        if quantization != "none":
            self.quantized_head.load(head, dtype, quantization)
        if quantization == "none" or self.quantized_head.qweight is None:
            self.quantized_head = None


def _checkpoint_name(module_name: str) -> str:
    """Our module path -> the HF checkpoint name (HF nests everything but lm_head under `model.`)."""
    if module_name.startswith("lm_head"):
        return module_name
    return "model." + module_name


def _linear_source(weights: dict[str, WeightSource], name: str) -> WeightSource:
    prefix, _, leaf = name.rpartition(".")
    parts = FUSED_PROJECTIONS.get(leaf)
    if parts is None:
        return _take(weights, name + ".weight")
    return concat_rows([_take(weights, f"{prefix}.{part}.weight") for part in parts])


def _take(weights: dict[str, WeightSource], name: str) -> WeightSource:
    if name not in weights:
        raise KeyError(f"checkpoint has no tensor {name!r}")
    return weights[name]


def _is_linear_param(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    return isinstance(model.get_submodule(module_name), Linear) if module_name else False


def _copy_into(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data = tensor.to(param.device, param.dtype).contiguous()
