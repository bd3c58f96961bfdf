"""Read a GGUF file: model config from its metadata, tensors under Hugging Face names.

Quantized matrices stay as raw blocks (GGUFQuantTensor) so a quantized kernel can run them;
everything else becomes a float32 tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from sluice.config import ModelConfig
from sluice.loaders.weights import GGUFQuantTensor, WeightSource

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    """The file is not a GGUF we can run; the message names the file and what is wrong."""


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as exc:  # the gguf package raises assorted errors on corrupt input
        raise GGUFError(f"cannot read GGUF file {path}: {exc}") from exc


def metadata(reader: GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader: GGUFReader, path: Path) -> ModelConfig:
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported ({SUPPORTED_ARCHITECTURES})"
        )

    def key(name: str, default: object = None) -> object:
        value = metadata(reader, f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    tokens = metadata(reader, "tokenizer.ggml.tokens", [])
    return ModelConfig(
        architecture=arch,
        vocab_size=int(key("vocab_size", len(tokens) or None)),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qk_norm=arch == "qwen3",
    )


def read_tensors(reader: GGUFReader, config: ModelConfig, path: Path) -> dict[str, WeightSource]:
    """All tensors under HF names, with llama.cpp's rotary row permutation of Q and K undone."""
    weights: dict[str, WeightSource] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        weight = _tensor_source(tensor, path)
        if config.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            weight = _unpermute_rotary_rows(weight, heads)
        weights[name] = weight
    return weights


def rope_frequency_factors(reader: GGUFReader) -> torch.Tensor | None:
    """Llama 3 GGUFs store their rope scaling as per-frequency divisors in `rope_freqs`."""
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            return torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return None


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _tensor_source(tensor, path: Path) -> WeightSource:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    if tensor.tensor_type in _FLOAT_TYPES:
        data = np.asarray(tensor.data)
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            # numpy has no bfloat16: the gguf package hands us its raw uint16 words
            return (
                torch.from_numpy(data.view(np.int16).copy())
                .view(torch.bfloat16)
                .float()
                .reshape(shape)
            )
        return torch.from_numpy(data.astype(np.float32)).reshape(shape)
    if len(shape) != 2:
        raise GGUFError(f"{path}: quantized tensor {tensor.name} has {len(shape)} dims, expected 2")
    try:
        GGMLQuantizationType(tensor.tensor_type)
    except ValueError as exc:
        raise GGUFError(
            f"{path}: tensor {tensor.name} has unknown type {tensor.tensor_type}"
        ) from exc
    blocks = np.asarray(tensor.data).reshape(shape[0], -1)
    return GGUFQuantTensor(GGMLQuantizationType(tensor.tensor_type), blocks, shape)


def _unpermute_rotary_rows(weight: WeightSource, num_heads: int) -> WeightSource:
    # llama.cpp's converter interleaves each head's two rotary halves; restore rotate-half order.
    rows = weight.shape[0]
    half = rows // num_heads // 2
    order = np.arange(rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(weight, GGUFQuantTensor):
        return weight.permute_rows(order)
    return weight[torch.from_numpy(order)]
