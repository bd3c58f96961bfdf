"""Every GGUF tensor type we claim loads into the same model transformers builds from its values.

A one-layer Llama is written to GGUF on the fly with all its matrices in one type; the reference
is transformers' LlamaForCausalLM holding gguf.quants.dequantize of those same blocks (Q and K
rows put back from llama.cpp's rotary interleave). The dense path must match it in fp32; the
quantized-kernel path must stay within bf16 error of the dense one.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from sluice.models.registry import load_model

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS
K_QUANTS = (QType.Q4_K, QType.Q5_K, QType.Q6_K)
TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, *K_QUANTS]


def llama_cpp_permutation(rows: int, heads: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Q and K: each head's two rotary halves interleaved."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def encode(weight: np.ndarray, qtype: QType, rng: np.random.Generator) -> np.ndarray:
    if qtype == QType.F32:
        return weight
    if qtype in K_QUANTS:  # gguf.quants cannot quantize these: random valid blocks instead
        return random_k_blocks(qtype, weight.shape[0], weight.shape[1], rng)
    return gguf.quants.quantize(weight, qtype)


def random_k_blocks(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    scale = rng.uniform(2e-3, 6e-3, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == QType.Q6_K:  # its one float16 scale is the last two bytes
        blocks[:, -2:] = scale[:, :2]
    else:  # Q4_K / Q5_K open with float16 d and dmin
        blocks[:, :4] = scale
    return blocks.reshape(rows, -1)


def decode(data: np.ndarray, qtype: QType, shape: tuple[int, int]) -> torch.Tensor:
    if qtype == QType.F32:
        return torch.from_numpy(data.copy())
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(shape).copy())


def write_tiny_gguf(path, qtype: QType) -> dict[str, torch.Tensor]:
    """Writes the GGUF; returns the HF-named float weights the file holds."""
    rng = np.random.default_rng(int(qtype))
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": 1, "context_length": 128, "embedding_length": HIDDEN,
        "feed_forward_length": FFN, "attention.head_count": HEADS,
        "attention.head_count_kv": KV_HEADS, "vocab_size": VOCAB,
    }.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<{i}>" for i in range(VOCAB)])
    writer.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    writer.add_token_merges([])
    writer.add_eos_token_id(1)
    matrices = {
        "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, HIDDEN), None),
        "output.weight": ("lm_head.weight", (VOCAB, HIDDEN), None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), HEADS),
        "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), KV_HEADS),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), None),
        "blk.0.attn_output.weight": ("model.layers.0.self_attn.o_proj.weight", (HIDDEN, HIDDEN), None),
        "blk.0.ffn_gate.weight": ("model.layers.0.mlp.gate_proj.weight", (FFN, HIDDEN), None),
        "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (FFN, HIDDEN), None),
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (HIDDEN, FFN), None),
    }  # fmt: skip
    hf: dict[str, torch.Tensor] = {}
    for name, (hf_name, shape, rotary_heads) in matrices.items():
        data = encode((rng.standard_normal(shape) * 0.05).astype(np.float32), qtype, rng)
        writer.add_tensor(name, data, raw_dtype=None if qtype == QType.F32 else qtype)
        weight = decode(data, qtype, shape)
        if rotary_heads is not None:  # the file holds permuted rows; HF holds the original order
            weight = weight[
                torch.from_numpy(np.argsort(llama_cpp_permutation(shape[0], rotary_heads)))
            ]
        hf[hf_name] = weight
    for name, hf_name in [
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        norm = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        writer.add_tensor(name, norm)
        hf[hf_name] = torch.from_numpy(norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def reference_model(weights: dict[str, torch.Tensor]):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(weights, strict=True)
    return model


def our_logits(path, ids: list[int], quantization: str) -> torch.Tensor:
    from sluice.attention.sdpa import SdpaBackend
    from sluice.cache.kv_cache import KVCache
    from sluice.layers.forward_context import ForwardContext

    cpu = torch.device("cpu")
    model = load_model(path, cpu, torch.float32, quantization).model
    cache = KVCache.allocate(model.config, 8, 16, torch.float32, cpu)
    ctx = ForwardContext.build(SdpaBackend(), cache, [len(ids)], [0], [list(range(8))], cpu)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), ctx))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_type_loads_into_the_reference_model(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    weights = write_tiny_gguf(path, qtype)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = reference_model(weights)(torch.tensor([ids])).logits[0]
    dense = our_logits(path, ids, "none")
    torch.testing.assert_close(dense, expected, atol=1e-4, rtol=0)
    kernel = our_logits(path, ids, "auto")
    relative = (kernel - expected).norm() / expected.norm()
    assert relative < 2e-2, f"quantized path deviates by {relative:.2e}"
