"""Read a Hugging Face checkpoint folder: config.json and *.safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from sluice.config import ModelConfig, RopeScaling

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}


def read_hf_config(folder: Path) -> ModelConfig:
    raw = json.loads((folder / "config.json").read_text())
    arch_name = (raw.get("architectures") or ["?"])[0]
    arch = _ARCHITECTURES.get(arch_name)
    if arch is None:
        raise ValueError(
            f"{folder}/config.json: architecture {arch_name!r} is not supported ({', '.join(_ARCHITECTURES)})"
        )
    if raw.get("sliding_window") and arch_name == "MistralForCausalLM":
        raise ValueError(f"{folder}: Mistral with a sliding window is not supported")
    heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        qk_norm=arch == "qwen3",
        rope_scaling=_rope_scaling(raw),
    )


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                weights[name] = f.get_tensor(name).float()
    return weights


def _rope_parameters(raw: dict) -> dict:
    # transformers 5 nests rope settings under `rope_parameters`; older configs keep them flat.
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_theta(raw: dict) -> float:
    return float(_rope_parameters(raw).get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict) -> RopeScaling | None:
    params = _rope_parameters(raw)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, llama3)")
    return RopeScaling(
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params["original_max_position_embeddings"],
    )
