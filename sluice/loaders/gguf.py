"""Read a GGUF file: model config from its metadata, tensors under Hugging Face names.

Quantized matrices stay as raw blocks (GGUFQuantTensor) so a quantized kernel can run them;
everything else becomes a float32 tensor. Tensors are read from the file when the model asks for
them, not memory-mapped: a map's pages stay resident until the whole model is loaded, which would
add the file's size (98 MB for the default model) to the loading peak.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from sluice.config import ModelConfig
from sluice.loaders.gguf_file import (
    GGUFFile,
    GGUFFormatError,
    GGUFTensorInfo,
    read_bytes,
    read_gguf,
)
from sluice.loaders.weights import GGUFQuantTensor, WeightSource

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")

# numpy has no bfloat16: its words are read as int16 and reinterpreted by torch.
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: np.int16,
}

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


@dataclass(frozen=True)
class _StoredTensor:
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order
    offset: int  # of its bytes in the file
    nbytes: int
    rotary_heads: int | None  # llama.cpp interleaved these Q or K rows; None for other tensors


class GGUFTensors(Mapping[str, WeightSource]):
    """A GGUF file's tensors under HF names, each read from the file on every lookup: only the
    tensors a loader is converting are resident."""

    def __init__(self, path: Path, stored: dict[str, _StoredTensor]) -> None:
        self._path = path
        self._stored = stored

    def __getitem__(self, name: str) -> WeightSource:
        stored = self._stored[name]
        raw = read_bytes(self._path, stored.offset, stored.nbytes)
        weight = _weight_source(stored, raw)
        if stored.rotary_heads is None:
            return weight
        return _unpermute_rotary_rows(weight, stored.rotary_heads)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


def open_gguf(path: Path) -> GGUFFile:
    try:
        return read_gguf(path)
    except (GGUFFormatError, OSError) as exc:
        raise GGUFError(f"cannot read GGUF file {path}: {exc}") from exc


def read_config(reader: GGUFFile, path: Path) -> ModelConfig:
    arch = reader.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported ({SUPPORTED_ARCHITECTURES})"
        )

    def key(name: str, default: object = None) -> object:
        value = reader.metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    tokens = reader.metadata.get("tokenizer.ggml.tokens", [])
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


def read_tensors(reader: GGUFFile, config: ModelConfig, path: Path) -> GGUFTensors:
    """All tensors under HF names, with llama.cpp's rotary row permutation of Q and K undone."""
    stored: dict[str, _StoredTensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is not None:
            stored[name] = _stored_tensor(tensor, _rotary_heads(name, config), path)
    return GGUFTensors(path, stored)


def rope_frequency_factors(reader: GGUFFile) -> torch.Tensor | None:
    """Llama 3 GGUFs store their rope scaling as per-frequency divisors in `rope_freqs`."""
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            return torch.from_numpy(reader.read(tensor).view(np.float32).copy())
    return None


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _rotary_heads(name: str, config: ModelConfig) -> int | None:
    if config.architecture != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    return config.num_heads if "q_proj" in name else config.num_kv_heads


def _stored_tensor(tensor: GGUFTensorInfo, rotary_heads: int | None, path: Path) -> _StoredTensor:
    """Where `tensor` lies and how to read it; a tensor we could not read is an error now,
    before any loading."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    try:
        qtype = GGMLQuantizationType(tensor.tensor_type)
    except ValueError as exc:
        raise GGUFError(
            f"{path}: tensor {tensor.name} has unknown type {tensor.tensor_type}"
        ) from exc
    if qtype not in _FLOAT_TYPES and len(shape) != 2:
        raise GGUFError(f"{path}: quantized tensor {tensor.name} has {len(shape)} dims, expected 2")
    return _StoredTensor(qtype, shape, int(tensor.data_offset), int(tensor.n_bytes), rotary_heads)


def _weight_source(stored: _StoredTensor, raw: np.ndarray) -> WeightSource:
    """A tensor's bytes (uint8, read from the file) -> what the model loads."""
    if stored.qtype not in _FLOAT_TYPES:
        return GGUFQuantTensor(stored.qtype, raw.reshape(stored.shape[0], -1), stored.shape)
    values = raw.view(_FLOAT_TYPES[stored.qtype])
    if stored.qtype == GGMLQuantizationType.BF16:
        return torch.from_numpy(values).view(torch.bfloat16).float().reshape(stored.shape)
    return torch.from_numpy(values.astype(np.float32, copy=False)).reshape(stored.shape)


def _unpermute_rotary_rows(weight: WeightSource, num_heads: int) -> WeightSource:
    # llama.cpp's converter interleaves each head's two rotary halves; restore rotate-half order.
    rows = weight.shape[0]
    half = rows // num_heads // 2
    order = np.arange(rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(weight, GGUFQuantTensor):
        return weight.permute_rows(order)
    return weight[torch.from_numpy(order)]
