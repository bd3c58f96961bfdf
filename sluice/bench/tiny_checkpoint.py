"""Tiny random checkpoints made on the fly with transformers, saved as HF folders.

Tests compare our model code against transformers on them; benchmarks of hybrid models run on
them (no hub, no download). `python -m sluice.bench.tiny_checkpoint ARCH FOLDER` writes one.
"""

from __future__ import annotations

import argparse
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


def make_tiny_checkpoint(arch: str, folder: Path, seed: int = 0, **sizes: int):
    """Save a random model plus a word-level tokenizer ("t0".."t511") into `folder`.

    `sizes` override config fields (hidden_size=256, num_hidden_layers=8, ...).
    """
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(arch)
    for name, value in sizes.items():
        setattr(config, name, value)
    if arch == "qwen3_next":  # DeltaNet and full attention take turns
        kinds = ("linear_attention", "full_attention")
        config.layer_types = [kinds[i % 2] for i in range(config.num_hidden_layers)]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # default init is near-uniform; widen it so logits have structure
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    if arch == "bamba":
        _give_heads_long_distinct_memories(model)
    if arch == "qwen3_next":
        _perturb_norms_and_slow_decays(model)
    model.eval().save_pretrained(folder)
    _write_word_tokenizer(folder)
    return model


def _give_heads_long_distinct_memories(model) -> None:
    """The default init forgets within a few tokens and gives every head the same D, and every
    channel the same norm weight; vary them and slow the decay, so that a state lost between
    steps, or read from the wrong slot or head, shows in the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
            if name.endswith("A_log"):
                p.sub_(3.5)  # A in [-0.2, -0.05]
            if name.endswith("dt_bias"):
                p.sub_(2.0)  # time steps around softplus(-1) ~ 0.3


def _perturb_norms_and_slow_decays(model) -> None:
    """Random init leaves the zero-centered norms at weight 0 (identity): move them off it, so a
    norm that ignores its weight, or misreads it as uncentered, shows. It also draws decay rates
    A up to 16, which wipe most heads' state every token: slow them down, so the state carried
    across chunks and decode steps matters. Fast decays also leave some DeltaNet outputs tiny,
    and the per-head gated norm then blows fp32 rounding up to ~1e-4 in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.3)
            elif name.endswith("A_log"):
                param.uniform_(-3, 0)
            elif name.endswith("dt_bias"):
                param.uniform_(-1, 0)


def _write_word_tokenizer(folder: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "t1", "eos_token": "t2", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=["llama", "qwen3", "mistral", "qwen3_next", "bamba"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--max-positions", type=int, default=None, help="context length")
    args = parser.parse_args()
    sizes = {
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "max_position_embeddings": args.max_positions,
    }
    make_tiny_checkpoint(
        args.arch, args.folder, args.seed, **{k: v for k, v in sizes.items() if v is not None}
    )
    print(args.folder)


if __name__ == "__main__":
    main()
