"""Read a Hugging Face checkpoint folder: config.json and *.safetensors shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from sluice.config import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    GatedDeltaNetConfig,
    Mamba2Config,
    ModelConfig,
    MoEConfig,
    RopeScaling,
)

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3NextForCausalLM": "qwen3_next",
    "BambaForCausalLM": "bamba",
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
    config = ModelConfig(
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
        partial_rotary_factor=float(_rope_parameters(raw).get("partial_rotary_factor", 1.0)),
    )
    hybrid = _HYBRID_FIELDS.get(arch)
    return replace(config, **hybrid(raw)) if hybrid else config


def _qwen3_next_fields(raw: dict) -> dict:
    return {
        "qk_norm": True,
        "layer_types": tuple(raw["layer_types"]),
        "linear_attention": GatedDeltaNetConfig(
            num_key_heads=raw["linear_num_key_heads"],
            num_value_heads=raw["linear_num_value_heads"],
            key_head_dim=raw["linear_key_head_dim"],
            value_head_dim=raw["linear_value_head_dim"],
            conv_kernel=raw["linear_conv_kernel_dim"],
        ),
        "moe": MoEConfig(
            num_experts=raw["num_experts"],
            num_experts_per_token=raw["num_experts_per_tok"],
            expert_intermediate_size=raw["moe_intermediate_size"],
            shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size") or 0,
            normalize_top_k=raw.get("norm_topk_prob", True),
            sparse_step=raw.get("decoder_sparse_step", 1),
            dense_layers=tuple(raw.get("mlp_only_layers") or ()),
        ),
    }


def _bamba_fields(raw: dict) -> dict:
    attention = set(raw.get("attn_layer_indices") or ())
    hidden, heads = raw["hidden_size"], raw["mamba_n_heads"]
    head_dim = raw.get("mamba_d_head", "auto")
    low, high = raw.get("time_step_limit") or (0.0, float("inf"))
    return {
        "layer_types": tuple(
            FULL_ATTENTION if i in attention else LINEAR_ATTENTION
            for i in range(raw["num_hidden_layers"])
        ),
        "mamba": Mamba2Config(
            num_heads=heads,
            head_dim=raw.get("mamba_expand", 2) * hidden // heads
            if head_dim == "auto"
            else head_dim,
            state_size=raw["mamba_d_state"],
            num_groups=raw.get("mamba_n_groups", 1),
            conv_kernel=raw.get("mamba_d_conv", 4),
            chunk_size=raw.get("mamba_chunk_size", 256),
            conv_bias=raw.get("mamba_conv_bias", True),
            proj_bias=raw.get("mamba_proj_bias", False),
            time_step_min=_json_float(low),
            time_step_max=_json_float(high),
        ),
    }


_HYBRID_FIELDS = {"qwen3_next": _qwen3_next_fields, "bamba": _bamba_fields}


def _json_float(value: float | dict) -> float:
    # transformers writes infinities as {"__float__": "Infinity"}: JSON has no literal for them.
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def quantized_to_int4(folder: Path) -> bool:
    """Whether `sluice compress --quantize int4` wrote this folder: its weights are already 4-bit
    values, which quantize to themselves, so `auto` loads them quantized."""
    raw = json.loads((folder / "config.json").read_text())
    return (raw.get("sluice_compression") or {}).get("quantize") == "int4"


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
