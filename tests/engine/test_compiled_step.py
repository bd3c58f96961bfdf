"""The compiled step (engine/compiled_step.py) and the paged decode kernel against the eager
code they compile, on the CPU and, where there is one, a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_harness import reference_greedy, token_ids
from torch._dynamo.utils import counters

from sluice import SamplingParams
from sluice.api import LLM
from sluice.attention.metadata import DecodeMetadata, runs_as_decode_rows
from sluice.attention.paged import paged_decode_attention, paged_decode_kernel
from sluice.attention.sdpa import SdpaBackend
from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.engine.model_runner import ModelRunner
from sluice.layers.forward_context import ForwardContext
from sluice.models.registry import load_model

pytestmark = pytest.mark.slow

PAGE_SIZE = 16


def eager_context(
    runner: ModelRunner,
    query_lens: list[int],
    context_lens: list[int],
    page_tables: list[list[int]],
) -> ForwardContext:
    """The step over the runner's cache through gather + SDPA, as `--no-compile` runs it."""
    return ForwardContext.build(
        SdpaBackend(), runner.kv_cache, query_lens, context_lens, page_tables, runner.device
    )


CUDA = pytest.mark.cuda  # skipped off CUDA (conftest), run by scripts/gpu_check.sh


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@torch.inference_mode()  # as the engine calls it: grad mode would compile it again
def test_paged_decode_kernel_matches_sdpa_over_gathered_pages(device):
    """The paged kernel (compiled, and as plain eager ops) against SDPA over gathered pages:
    GQA, scattered pages, contexts that end mid-page, padding columns past a context."""
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 80, PAGE_SIZE, 3, 64, generator=generator).to(device)
    for kv_lens, num_pages in (([1, 16, 17], 2), ([200, 5, 64, 129, 33], 13)):
        tables = torch.randperm(79, generator=generator)[: len(kv_lens) * num_pages] + 1
        tables = tables.view(len(kv_lens), num_pages).to(device)
        q = torch.randn(len(kv_lens), 9, 64, generator=generator).to(device)
        lens = torch.tensor(kv_lens, device=device)
        expected = torch.cat(
            [sdpa_reference(q[i], k_cache, v_cache, tables[i], n) for i, n in enumerate(kv_lens)]
        )
        for kernel in (paged_decode_attention, paged_decode_kernel):
            got = kernel(q, k_cache, v_cache, tables, lens, 0.125)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def sdpa_reference(q, k_cache, v_cache, pages, kv_len) -> torch.Tensor:
    keys = k_cache[pages].flatten(0, 1)[:kv_len].transpose(0, 1)  # [kv_heads, kv_len, dim]
    values = v_cache[pages].flatten(0, 1)[:kv_len].transpose(0, 1)
    out = F.scaled_dot_product_attention(q.unsqueeze(1), keys, values, scale=0.125, enable_gqa=True)
    return out.reshape(1, -1)


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """A tiny random Llama with the default model's head size and grouped queries, four layers
    deep: what is under test is how the step is compiled and run, which a model of four layers
    shows as well as one of thirty, and it compiles in seconds rather than minutes. A model of
    its own, too: the suite's shared one has its graphs compiled for the default float16 pools."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    sizes = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)
    make_tiny_checkpoint(
        "llama", folder, num_hidden_layers=4, max_position_embeddings=2048, **sizes
    )
    return load_model(folder, torch.device("cpu"), torch.float32, quantization="none")


def test_logits_match_eager_for_every_step_from_one_graph(own_model):
    """Decodes alone and in batches of up to 6, verify steps (1 + k tokens of a request) alone
    and beside decodes, a short prompt (the decode graph, a row per token: cache writes and the
    paged kernel traced in), longer prefill chunks alone and beside decodes (the other graph),
    steps that sample every row, some, or none; contexts of different lengths in consecutive or
    scattered pages: the compiled logits and cache writes equal the eager forward's, nothing
    recompiles. Over fp32 pages, where the two agree to ~4e-5 in logits of magnitude ~10 (over
    float16 ones they differ more; test_engine checks that those keep the real model's greedy
    output)."""
    config = EngineConfig.create(quantization="none", num_pages=64, kv_cache_dtype="float32")
    engine = Engine(config, loaded=own_model)  # made as engines are, outside inference mode
    with torch.inference_mode():  # as the runner calls it: grad mode would compile it again
        check_logits_match_eager(engine.executor)


def test_a_verify_step_runs_the_decode_graph(own_model, monkeypatch):
    """A step of a decode beside a request verifying 5 drafts runs the decode graph (the other
    graph, with its opaque attention operator and Python between layers, is not called) and gives
    the eager forward's logits for every sampled row; the draft tokens see the ones before them
    (their keys are written before any row attends)."""
    config = EngineConfig.create(quantization="none", num_pages=64, kv_cache_dtype="float32")
    runner = Engine(config, loaded=own_model).executor
    compiled = runner.compiled_step

    def refuse(*args):
        raise AssertionError("a verify step ran the mixed-step graph")

    monkeypatch.setattr(compiled, "_graph", refuse)
    generator = torch.Generator().manual_seed(1)
    vocab = own_model.model.config.vocab_size
    with torch.inference_mode():
        prefill = torch.randint(0, vocab, (60,), generator=generator)
        own_model.model(prefill, eager_context(runner, [60], [0], [[1, 2, 3, 4]]))
        ids = torch.randint(0, vocab, (7,), generator=generator)
        query_lens, context_lens, tables = [1, 6], [25, 59], [[9, 10], [1, 2, 3, 4, 5]]
        rows = torch.arange(7)
        ctx = eager_context(runner, query_lens, context_lens, tables)
        eager = own_model.model.compute_logits(own_model.model(ids, ctx)[rows])
        ctx = runner.forward_context(query_lens, context_lens, tables)
        got = compiled(ids, ctx, rows)
    torch.testing.assert_close(got, eager, atol=1.5e-4, rtol=0)
    assert torch.equal(got.argmax(-1), eager.argmax(-1))


def test_an_engine_with_other_pools_gets_graphs_of_its_own(own_model):
    """The graphs guard the KV cache through its K and V tensors: a second engine with float16
    pools on a model compiled for fp32 ones must get graphs of its own, not run the fp32 graphs
    over half-precision bytes."""

    def engine(**options) -> LLM:
        config = EngineConfig.create(quantization="none", **options)
        return LLM.from_engine(Engine(config, loaded=own_model))

    engine(kv_cache_dtype="float32")  # the model's graphs, compiled for fp32 pools
    graphs = counters["stats"]["unique_graphs"]
    half = engine(kv_cache_dtype="float16")
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    got = token_ids(half.generate([prompt], params))
    assert counters["stats"]["unique_graphs"] > graphs
    eager = engine(kv_cache_dtype="float16", compile=False)
    assert token_ids(eager.generate([prompt], params)) == got


def check_logits_match_eager(runner: ModelRunner) -> None:
    model, compiled = runner.model, runner.compiled_step
    assert compiled is not None
    generator = torch.Generator().manual_seed(0)
    # Fill pages 1..63 with keys and values of real tokens: one prefill of 1000 tokens.
    prefill_ids = torch.randint(0, model.config.vocab_size, (1000,), generator=generator)
    model(prefill_ids, eager_context(runner, [1000], [0], [list(range(1, 64))]))
    graphs = counters["stats"]["unique_graphs"]
    cases = [  # query lengths, context lengths, page tables, sampled rows
        ([1], [5], [[1]], [0]),  # one stream, one page
        ([1], [300], [list(range(1, 20))], [0]),  # one stream, consecutive pages
        ([1, 1], [40, 7], [[9, 3, 30], [44]], [0, 1]),  # scattered pages
        (
            [1] * 6,
            [33, 64, 1, 120, 17, 90],
            [list(range(10 * i + 1, 10 * i + 9)) for i in range(6)],
            list(range(6)),
        ),
        ([6], [40], [[5, 6, 7]], list(range(6))),  # a verify step: 1 + 5 drafts
        (
            [1, 6, 1, 9],
            [70, 31, 12, 8],
            [[1, 2, 3, 4, 5], [20, 21, 22], [30], [40, 41]],
            [0, 6, 7, 16],
        ),
        ([12], [0], [[55]], [11]),  # a short prompt: decode rows too
        ([20], [0], [[50, 51]], [19]),  # a whole prompt
        ([20], [16], [[50, 51, 52]], []),  # a chunk that samples nothing
        ([1, 37, 1], [70, 3, 12], [[1, 2, 3, 4, 5], [20, 21, 22], [30]], [0, 38]),  # mixed
    ]
    last_keys = runner.kv_cache.slots(model.config.num_layers - 1)[0]
    for query_lens, context_lens, page_tables, rows in cases:
        ids = torch.randint(0, model.config.vocab_size, (sum(query_lens),), generator=generator)
        rows = torch.tensor(rows, dtype=torch.long)
        ctx = eager_context(runner, query_lens, context_lens, page_tables)
        eager = model.compute_logits(model(ids, ctx)[rows])
        written = ctx.attn.slot_mapping
        eager_keys = last_keys[written].clone()
        last_keys[written] = 0  # the compiled step must write this step's keys itself
        ctx = runner.forward_context(query_lens, context_lens, page_tables)
        assert isinstance(ctx.attn, DecodeMetadata) == runs_as_decode_rows(query_lens)
        got = compiled(ids, ctx, rows)
        # Several tokens of a request attend through the paged kernel compiled and through SDPA
        # eagerly (see the keys below): their logits differ by up to ~4e-5.
        torch.testing.assert_close(got, eager, atol=1.5e-4, rtol=0)
        assert torch.equal(got.argmax(-1), eager.argmax(-1))
        # Prompt tokens attend through the paged kernel compiled and through SDPA eagerly: each
        # layer's outputs agree to ~1e-6, which the 3 layers before the last grow to ~6e-5.
        torch.testing.assert_close(last_keys[written], eager_keys, atol=1.5e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs


@CUDA
def test_tiny_llama_on_cuda_matches_transformers_with_graphs_or_eager(tmp_path):
    """The same engine on a GPU (FlexAttention, decode steps from CUDA graphs or eager; the
    CPU's compiled step is not used there): greedy tokens of a tiny random Llama, batched in
    16-token steps, equal transformers' full-forward greedy."""
    reference = make_tiny_checkpoint("llama", tmp_path).to("cuda")
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3] * 17]
    expected = [reference_greedy(reference, p, 24) for p in prompts]
    for graphs in (False, True):
        llm = LLM(
            model=str(tmp_path),
            device="cuda",
            dtype="float32",
            cuda_graphs=graphs,
            kv_cache_memory_gb=0.25,
            max_num_batched_tokens=16,
        )
        assert llm.engine.executor.compiled_step is None
        assert (llm.engine.executor.cuda_graphs is not None) == graphs
        results = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
        assert [r.outputs[0].token_ids for r in results] == expected
