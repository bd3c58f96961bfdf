"""What every causal LM here shares: embeddings, final norm, the exact + shortlisting LM heads,
HF-named weight loading, the forward over `self.layers`, and discovery of the layers that keep
KV pages or state.

A model subclass builds `self.layers`, each called as `layer(x, ctx)` with the step's forward
context. Weight loading is generic because module
paths mirror the checkpoint's names (`model.` + our path); projections that we fuse are listed
in FUSED_PROJECTIONS and loaded as their parts stacked by rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sluice.config import ModelConfig
from sluice.kernels import topk_cpu
from sluice.layers.attention import PagedAttention
from sluice.layers.embedding import Embedding
from sluice.layers.forward_context import ForwardContext
from sluice.layers.linear import Linear, Quantization
from sluice.layers.logits import shortlisted_logits
from sluice.layers.norm import RMSNorm
from sluice.loaders.weights import GGUFQuantTensor, WeightSource, concat_rows, to_dense

# Checkpoint projections that we run as one fused matmul: fused name -> its parts, in order.
FUSED_PROJECTIONS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class CausalLM(nn.Module):
    # Our top-level module -> the checkpoint's name for it, where a model's differs (under `model.`).
    CHECKPOINT_RENAMES: ClassVar[dict[str, str]] = {}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The head's exact rows, one per token (tied models: embed_tokens itself).
        self.lm_head = Embedding(config.vocab_size, config.hidden_size)
        # A 4-bit copy that ranks the vocabulary; None when the head runs dense alone.
        self.quantized_head: Linear | None = Linear(config.hidden_size, config.vocab_size)
        # Whether sluice's kernel selects the shortlist (decided once loaded, not while tracing).
        self.native_top_k = False

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Flat tokens of all scheduled requests in, final hidden states out."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def attention_layers(self) -> list[PagedAttention]:
        """Layers that keep KV pages, in their order in the KV cache."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def state_layers(self) -> list[nn.Module]:
        """Recurrent layers of a hybrid model, in their order in the state cache: they declare
        per-slot state with `state_spec`."""
        return [m for m in self.modules() if hasattr(m, "state_spec")]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quantized_head is None:
            return F.linear(hidden, self.lm_head.weight).float()
        return shortlisted_logits(hidden, self.quantized_head, self.lm_head, self.native_top_k)

    def load_weights(
        self,
        weights: Mapping[str, WeightSource],
        dtype: torch.dtype,
        quantization: Quantization = "none",
    ) -> None:
        """Fill every parameter from HF-named checkpoint tensors; a missing one is an error."""
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module is not self.quantized_head:
                source = _linear_source(weights, self._checkpoint_name(name))
                module.load(source, dtype, quantization)
        for name, param in self.named_parameters():
            if not _is_loaded_by_its_module(self, name):
                _copy_into(param, to_dense(_take(weights, self._checkpoint_name(name))), name)
        self.to(dtype=dtype)
        self._load_tables(weights, dtype, quantization)

    def _checkpoint_name(self, module_name: str) -> str:
        """Our module path -> the HF checkpoint name (HF nests everything but lm_head under `model.`)."""
        if module_name.startswith("lm_head"):
            return module_name
        top, dot, rest = module_name.partition(".")
        return "model." + self.CHECKPOINT_RENAMES.get(top, top) + dot + rest

    def _load_tables(
        self, weights: Mapping[str, WeightSource], dtype: torch.dtype, quantization: Quantization
    ) -> None:
        """The embedding, the head's exact rows and its quantized copy. A table kept as Q8_0
        blocks serves row lookups only: without a quantized copy to rank the vocabulary, the head
        multiplies its whole table and needs it dense."""
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in weights
        embed = _take(weights, self._checkpoint_name("embed_tokens") + ".weight")
        head = embed if tied else _take(weights, "lm_head.weight")
        self._load_quantized_head(head, quantization)
        ranked = self.quantized_head is not None
        if tied:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head.load(head, dtype, keep_q8_0=ranked)
        keep_embed_q8_0 = quantization != "none" and (ranked or not tied)
        self.embed_tokens.load(embed, dtype, keep_q8_0=keep_embed_q8_0)

    def _load_quantized_head(self, head: WeightSource, quantization: Quantization) -> None:
        """A 4-bit copy where the model runs quantized weights (a quantized GGUF head, or
        `int8`/`int4` on load): the shortlist's exact rescoring makes its own error harmless."""
        quantized = isinstance(head, GGUFQuantTensor) or quantization in ("int8", "int4")
        if quantization != "none" and quantized:
            self.quantized_head.load_int4_copy(head)
        if self.quantized_head.qweight is None:
            self.quantized_head = None
        elif self.norm.weight.device.type == "cpu":
            self.native_top_k = topk_cpu.available()


def _linear_source(weights: Mapping[str, WeightSource], name: str) -> WeightSource:
    prefix, _, leaf = name.rpartition(".")
    parts = FUSED_PROJECTIONS.get(leaf)
    if parts is None:
        return _take(weights, name + ".weight")
    return concat_rows([_take(weights, f"{prefix}.{part}.weight") for part in parts])


def _take(weights: Mapping[str, WeightSource], name: str) -> WeightSource:
    if name not in weights:
        raise KeyError(f"checkpoint has no tensor {name!r}")
    return weights[name]


def _is_loaded_by_its_module(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else None
    return isinstance(module, (Linear, Embedding))


def _copy_into(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data = tensor.to(param.device, param.dtype).contiguous()
