"""Write a (compressed) model as a Hugging Face folder sluice loads back: config.json,
model.safetensors (float32, the masks implied by the zeros) and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from sluice.config import ModelConfig
from sluice.layers.linear import Linear
from sluice.loaders.tokenizer import Tokenizer
from sluice.models.base import FUSED_PROJECTIONS, CausalLM
from sluice.models.registry import LoadedModel

_ARCHITECTURE_NAMES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# config.json key recording how the weights were made; the loader reads "quantize" from it.
COMPRESSION_KEY = "sluice_compression"  # as loaders/safetensors.py reads it


def save_checkpoint(loaded: LoadedModel, folder: Path, compression: dict) -> None:
    if loaded.config.architecture not in _ARCHITECTURE_NAMES:
        raise ValueError(
            f"cannot write a {loaded.config.architecture} checkpoint "
            f"({', '.join(_ARCHITECTURE_NAMES)})"
        )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(loaded.model), str(folder / "model.safetensors"))
    config = hf_config(loaded.config, loaded.tokenizer)
    config[COMPRESSION_KEY] = compression
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded.tokenizer.save_hf_folder(folder)


def checkpoint_tensors(model: CausalLM) -> dict[str, Tensor]:
    """Every weight under its HF name, fused projections split back into their parts."""
    tensors: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module is not model.quantized_head:
            tensors.update(_linear_parts(model, name, module))
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, Linear) and name not in ("lm_head.weight",):
            tensors[model._checkpoint_name(name)] = param.data
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight.data
    return {name: t.float().contiguous() for name, t in tensors.items()}


def _linear_parts(model: CausalLM, name: str, linear: Linear) -> dict[str, Tensor]:
    weight = linear.weight if linear.weight is not None else linear.qweight.dequantize()
    checkpoint_name = model._checkpoint_name(name)
    prefix, _, leaf = checkpoint_name.rpartition(".")
    parts = FUSED_PROJECTIONS.get(leaf)
    if parts is None:
        return {checkpoint_name + ".weight": weight.data}
    parent = model.get_submodule(name.rpartition(".")[0])
    sizes = getattr(parent, "split_sizes", None) or [weight.shape[0] // len(parts)] * len(parts)
    pieces = weight.data.split(sizes)
    return {f"{prefix}.{part}.weight": piece for part, piece in zip(parts, pieces, strict=True)}


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    raw = {
        "architectures": [_ARCHITECTURE_NAMES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": sorted(tokenizer.eos_token_ids),
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        raw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    if config.partial_rotary_factor != 1.0:
        raw["partial_rotary_factor"] = config.partial_rotary_factor
    return raw


def num_weight_bytes(model: CausalLM) -> int:
    """Bytes the linear layers' weights occupy as loaded (dense or quantized)."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear) and module is not model.quantized_head:
            if module.qweight is not None:
                total += module.qweight.nbytes()
            else:
                total += module.weight.numel() * module.weight.element_size()
    return total
