"""Build a model from a resolved checkpoint (GGUF file or HF folder): one model code, two loaders."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sluice.config import ModelConfig
from sluice.layers.linear import Quantization
from sluice.layers.rotary import inverse_frequencies
from sluice.loaders import gguf, safetensors
from sluice.loaders.tokenizer import Tokenizer
from sluice.memory import loading_allocations_mapped, release_freed_heap
from sluice.models.bamba import BambaForCausalLM
from sluice.models.base import CausalLM
from sluice.models.llama import LlamaForCausalLM
from sluice.models.qwen3_next import Qwen3NextForCausalLM

logger = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "bamba": BambaForCausalLM,
    "qwen3_next": Qwen3NextForCausalLM,
}


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype, quantization: Quantization = "none"
) -> LoadedModel:
    start = time.perf_counter()
    with loading_allocations_mapped():
        model, config, tokenizer = _load(path, device, dtype, quantization)
    logger.info(
        "loaded %s (%s, %s) in %.1fs",
        path.name,
        config.architecture,
        dtype,
        time.perf_counter() - start,
    )
    return LoadedModel(model, config, tokenizer, path)


def _load(
    path: Path, device: torch.device, dtype: torch.dtype, quantization: Quantization
) -> tuple[CausalLM, ModelConfig, Tokenizer]:
    if path.suffix == ".gguf":
        config, weights, inv_freq, tokenizer = _read_gguf(path)
    else:
        if quantization == "auto" and safetensors.quantized_to_int4(path):
            quantization = "int4"  # `sluice compress --quantize int4` wrote it for that kernel
        config = safetensors.read_hf_config(path)
        weights = safetensors.read_hf_tensors(path)
        inv_freq = None
        tokenizer = Tokenizer.from_hf_folder(path)
    with device:
        model = MODEL_CLASSES[config.architecture](config, inv_freq)
    model.load_weights(weights, dtype, quantization)
    model.eval()
    del weights
    release_freed_heap()
    return model, config, tokenizer


def _read_gguf(
    path: Path,
) -> tuple[ModelConfig, gguf.GGUFTensors, torch.Tensor | None, Tokenizer]:
    """Everything but the weights' values, which the model reads tensor by tensor. The reader's
    parsed metadata (numpy arrays per vocabulary entry, ~150 MB for the default model) is
    returned to the OS before loading starts, not held through it."""
    reader = gguf.open_gguf(path)
    config = gguf.read_config(reader, path)
    weights = gguf.read_tensors(reader, config, path)
    inv_freq = _gguf_inverse_frequencies(reader, config)
    tokenizer = Tokenizer.from_gguf(reader)
    del reader
    release_freed_heap()
    return config, weights, inv_freq, tokenizer


def _gguf_inverse_frequencies(reader, config: ModelConfig) -> torch.Tensor | None:
    factors = gguf.rope_frequency_factors(reader)
    if factors is None:
        return None
    return inverse_frequencies(config.rotary_dim, config.rope_theta, None) / factors
