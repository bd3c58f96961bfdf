"""The GPU path on a CUDA device (`pytest -m cuda`, run by scripts/gpu_check.sh): logits against
transformers on tiny checkpoints of every architecture in bf16 and fp32, the default model's
greedy output the same with CUDA graphs on and off and alone or in a batch, no page leaked, and
the int4 weights' CUDA layout holding the very weights of the CPU's."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from model_harness import assert_no_leaks, prompts, token_ids

from sluice.api import LLM
from sluice.attention.flex import FlexBackend
from sluice.attention.select import select_backend
from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from sluice.cache.kv_cache import KVCache
from sluice.engine.model_runner import allocate_state
from sluice.layers.forward_context import ForwardContext
from sluice.layers.quant import Int4CudaPackedWeight, Int4PackedWeight, from_gguf_blocks
from sluice.models.registry import load_model
from sluice.sampling_params import SamplingParams

pytestmark = pytest.mark.cuda
cuda = torch.device("cuda")
# bf16 logits: relative to the logits' range (the reference itself rounds every op to bf16)
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2}
PAGE_SIZE = 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "qwen3_next", "bamba"])
def test_logits_match_transformers(arch, dtype, tmp_path):
    reference = make_tiny_checkpoint(arch, tmp_path).to(cuda, dtype).eval()
    model = load_model(tmp_path, cuda, dtype).model
    assert isinstance(select_backend(model.config.head_dim, cuda, compiled=False), FlexBackend)
    batch = prompts([5, 40, 1])
    # pages interleaved across the prompts, so a wrong table cannot go unnoticed
    tables = [list(range(s, 24, len(batch))) for s in range(len(batch))]
    kv = KVCache.allocate(model.config, 24, PAGE_SIZE, dtype, cuda)
    state = allocate_state(model, len(batch), dtype, cuda) if model.config.is_hybrid else None
    ctx = ForwardContext.build(
        FlexBackend(compiled=True),
        kv,
        [len(p) for p in batch],
        [0] * len(batch),
        tables,
        cuda,
        state,
        list(range(len(batch))) if state is not None else None,
    )
    ids = torch.tensor([t for p in batch for t in p], device=cuda)
    with torch.inference_mode():
        got = model.compute_logits(model(ids, ctx)).float().split([len(p) for p in batch])
        for prompt, logits in zip(batch, got):
            want = reference(torch.tensor([prompt], device=cuda)).logits[0].float()
            scale = want.abs().max()
            assert (logits - want).abs().max() <= TOLERANCE[dtype] * scale


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def gpu_llms(request):
    """The default model (int4 weights where bf16) with CUDA graphs on and off."""
    options = dict(device="cuda", dtype=request.param, max_num_seqs=16, compile=False)
    llms = [LLM(cuda_graphs=graphs, **options) for graphs in (True, False)]
    yield llms
    for llm in llms:
        assert_no_leaks(llm.engine)


TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 5, 8,"]


def test_greedy_identical_with_graphs_on_and_off(gpu_llms):
    graphs, eager = gpu_llms
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    assert graphs.engine.executor.cuda_graphs is not None
    assert eager.engine.executor.cuda_graphs is None
    assert token_ids(graphs.generate(TEXTS, params)) == token_ids(eager.generate(TEXTS, params))


def test_batch_invariance(gpu_llms):
    """A prompt decodes to the same tokens alone (bucket 1) as beside 11 others (bucket 16)."""
    graphs, _ = gpu_llms
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    alone = [token_ids(graphs.generate([t], params))[0] for t in TEXTS]
    together = token_ids(graphs.generate(TEXTS * 3, params))
    assert together == alone * 3


def test_seeded_sampling_and_logprobs_on_cuda(gpu_llms):
    graphs, eager = gpu_llms
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7, logprobs=2)
    first, second = graphs.generate(TEXTS, params), eager.generate(TEXTS, params)
    assert token_ids(first) == token_ids(second)
    assert all(c.logprobs for r in first for c in r.outputs)


@pytest.mark.parametrize(
    "qtype",
    [
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q8_0,
    ],
)
def test_cuda_int4_weights_are_the_cpu_weights(qtype):
    rng = np.random.default_rng(0)
    blocks = gguf.quants.quantize(rng.standard_normal((72, 576)).astype(np.float32), qtype)
    on_cpu = from_gguf_blocks(qtype, blocks, (72, 576), "cpu", "int4pack")
    on_gpu = from_gguf_blocks(qtype, blocks, (72, 576), cuda)
    assert isinstance(on_cpu, Int4PackedWeight) and isinstance(on_gpu, Int4CudaPackedWeight)
    dense = on_cpu.dequantize()
    assert torch.equal(on_gpu.dequantize(), dense)
    x = torch.randn(5, 576, dtype=torch.bfloat16)
    want = x.float() @ dense.T
    got = on_gpu.matmul(x.to(cuda)).float().cpu()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
