"""What every causal LM here shares: embeddings, final norm, the exact + shortlisting LM heads,
HF-named weight loading, and discovery of the layers the runner binds caches and state to.

A model subclass builds `self.layers` and `forward`. Weight loading is generic because module
paths mirror the checkpoint's names (`model.` + our path); projections that we fuse are listed
in FUSED_PROJECTIONS and loaded as their parts stacked by rows.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sluice.config import ModelConfig
from sluice.layers.attention import AttentionMetadata, PagedAttention
from sluice.layers.linear import Linear, Quantization
from sluice.layers.logits import shortlisted_logits
from sluice.layers.norm import RMSNorm
from sluice.layers.state import StateMetadata
from sluice.loaders.weights import WeightSource, concat_rows, to_dense

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
        # Left uninitialised (not resident): the checkpoint's table replaces it.
        empty = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=empty)
        self.embed_tokens.weight.requires_grad_(False)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)  # dense, exact
        # A quantized copy that ranks the vocabulary; None when the head runs dense alone.
        self.quantized_head: Linear | None = Linear(config.hidden_size, config.vocab_size)

    def attention_layers(self) -> list[PagedAttention]:
        """Layers that hold KV pages, in order."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def state_layers(self) -> list[nn.Module]:
        """Recurrent layers of a hybrid model: they declare per-slot state with `state_spec`."""
        return [m for m in self.modules() if hasattr(m, "state_spec")]

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
                source = _linear_source(weights, self._checkpoint_name(name))
                module.load(source, dtype, quantization)
        for name, param in self.named_parameters():
            if not _is_linear_param(self, name):
                _copy_into(param, to_dense(_take(weights, self._checkpoint_name(name))), name)
        self.to(dtype=dtype)
        head = _take(weights, "model.embed_tokens.weight" if tied else "lm_head.weight")
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.load(head, dtype, "none")
        self._load_quantized_head(head, dtype, quantization)

    def _checkpoint_name(self, module_name: str) -> str:
        """Our module path -> the HF checkpoint name (HF nests everything but lm_head under `model.`)."""
        if module_name.startswith("lm_head"):
            return module_name
        top, dot, rest = module_name.partition(".")
        return "model." + self.CHECKPOINT_RENAMES.get(top, top) + dot + rest

    def _load_quantized_head(
        self, head: WeightSource, dtype: torch.dtype, quantization: Quantization
    ) -> None:
        if quantization != "none":
            self.quantized_head.load(head, dtype, quantization)
        if quantization == "none" or self.quantized_head.qweight is None:
            self.quantized_head = None


class HybridCausalLM(CausalLM):
    """A model whose layers mix tokens either by attention (KV pages) or by a recurrence (state
    slots); every layer gets both views of the step and uses its own."""

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, state: StateMetadata
    ) -> torch.Tensor:
        """Flat tokens of all scheduled requests in, final hidden states out."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, meta, state)
        return self.norm(x)


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
