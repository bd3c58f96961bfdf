"""Tiny random checkpoints made on the fly with transformers, saved as HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB_SIZE = 512

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str):
    import transformers

    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(**_COMMON, rope_scaling=rope, tie_word_embeddings=False)
    if arch == "qwen3":
        return transformers.Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**_COMMON, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen3_next":
        return transformers.Qwen3NextConfig(
            **{**_COMMON, "num_hidden_layers": 4},
            head_dim=16,
            layer_types=[
                "linear_attention",
                "full_attention",
                "linear_attention",
                "full_attention",
            ],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[2],
            tie_word_embeddings=False,
        )
    if arch == "bamba":
        return transformers.BambaConfig(
            **{**_COMMON, "num_hidden_layers": 4},
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_chunk_size=8,
            tie_word_embeddings=False,
        )
    raise ValueError(arch)


def make_tiny_checkpoint(arch: str, folder: Path, seed: int = 0):
    """Save a random model plus a word-level tokenizer ("t0".."t511") into `folder`."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():  # default init is near-uniform; widen it so logits have structure
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.eval().save_pretrained(folder)
    _write_word_tokenizer(folder)
    return model


def _write_word_tokenizer(folder: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "t1", "eos_token": "t2", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
