"""The caches (cache/): each engine owns its own, none lives on the model's modules, several work
side by side in one process, and pages and state slots move from one cache to another."""

from __future__ import annotations

import pytest
import torch
from model_harness import reference_greedy, reference_logits
from torch._dynamo.utils import counters

from sluice import SamplingParams
from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.engine.model_runner import ModelRunner
from sluice.models.registry import LoadedModel, load_model

PAGE = 4
CACHE_NAMES = {"k_cache", "v_cache", "conv_state", "ssm_state", "recurrent_state", "state"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[object, LoadedModel]]:
    """A tiny random checkpoint of each kind of model: transformers' model and ours."""
    models = {}
    for arch in ("llama", "qwen3_next", "bamba"):
        folder = tmp_path_factory.mktemp(arch)
        reference = make_tiny_checkpoint(arch, folder)
        models[arch] = reference, load_model(folder, torch.device("cpu"), torch.float32)
    return models


def tiny_engine(loaded: LoadedModel, **options) -> Engine:
    options = {"page_size": PAGE, "compile": False, "kv_cache_dtype": "float32", **options}
    return Engine(EngineConfig.create(quantization="none", dtype="float32", **options), loaded)


def random_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()


def greedy_alternately(runs: list[tuple[Engine, list[int]]], max_tokens: int) -> list[list[int]]:
    """Each engine greedy-decodes its prompt; the engines take one step each in turn."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for engine, prompt in runs:
        engine.add_request("r", engine.prepare(prompt, params))
    tokens: list[list[int]] = [[] for _ in runs]
    while any(engine.has_unfinished_requests() for engine, _ in runs):
        for i, (engine, _) in enumerate(runs):
            for output in engine.step():
                tokens[i].extend(output.new_token_ids)
    return tokens


def assert_no_cache_on_modules(engine: Engine) -> None:
    """The model's modules hold their weights (parameters) and nothing of any engine's caches."""
    for name, module in engine.executor.model.named_modules():
        assert not CACHE_NAMES & set(vars(module)), f"{name} holds a cache attribute"
        tensors = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
        assert not tensors, f"{name} holds tensors {tensors} outside its parameters"


def test_two_engines_over_two_models_step_alternately(tiny):
    """A Llama and a hybrid (KV cache and state cache), stepping in turn, each give
    transformers' greedy tokens, as they do alone."""
    runs = [
        (tiny_engine(tiny[arch][1]), random_tokens(n, n))
        for arch, n in [("llama", 9), ("qwen3_next", 14)]
    ]
    expected = [
        reference_greedy(tiny[arch][0], prompt, 10)
        for arch, (_, prompt) in zip(("llama", "qwen3_next"), runs)
    ]
    assert greedy_alternately(runs, 10) == expected
    for engine, _ in runs:
        assert_no_cache_on_modules(engine)


def test_engines_sharing_a_model_step_alternately(make_llm):
    """Two compiled engines over the one default model, with caches of different sizes, step in
    turn through the model's graphs: each gives the tokens it gives alone (the second time from
    its own prefix cache, which a shared cache would have overwritten), and neither compiles
    anything once built."""
    engines = [make_llm(num_pages=64).engine, make_llm(num_pages=40).engine]
    assert engines[0].executor.compiled_step is engines[1].executor.compiled_step
    assert engines[0].executor.kv_cache.k is not engines[1].executor.kv_cache.k
    prompts = [
        engine.encode_prompt(p) for engine, p in zip(engines, ("Once upon a time", "The sky is"))
    ]
    graphs = counters["stats"]["unique_graphs"]
    alone = [
        greedy_alternately([(engine, prompt)], 12)[0] for engine, prompt in zip(engines, prompts)
    ]
    assert greedy_alternately(list(zip(engines, prompts)), 12) == alone
    assert counters["stats"]["unique_graphs"] == graphs
    for engine in engines:
        assert_no_cache_on_modules(engine)


def step(
    runner: ModelRunner, ids: list[int], done: int, pages: list[int], slot: int
) -> torch.Tensor:
    """Logits of a step of one request's `ids` after its `done` cached tokens."""
    slots = [slot] if runner.state_cache is not None else None
    ctx = runner.forward_context([len(ids)], [done], [pages], slots)
    return runner.model.compute_logits(runner.model(torch.tensor(ids), ctx))


@pytest.mark.parametrize("arch", ["llama", "qwen3_next", "bamba"])
@torch.inference_mode()
def test_exported_pages_and_state_continue_in_another_engine(tiny, arch):
    """A prompt prefilled in one engine, its pages (and state slot) exported and imported into
    another engine's cache at other page ids (and slot): the next token's logits there are the
    first engine's, and transformers'."""
    reference, loaded = tiny[arch]
    source, target = (
        tiny_engine(loaded, num_pages=32).executor,
        tiny_engine(loaded, num_pages=20).executor,
    )
    prompt = random_tokens(10, seed=3)
    pages_a, pages_b, slot_a, slot_b = [5, 2, 7], [1, 9, 3], 1, 0
    token = int(step(source, prompt, 0, pages_a, slot_a)[-1].argmax())
    target.kv_cache.import_pages(pages_b, source.kv_cache.export_pages(pages_a))
    if source.state_cache is not None:
        target.state_cache.import_slot(slot_b, source.state_cache.export_slot(slot_a))
    got = step(target, [token], len(prompt), pages_b, slot_b)
    expected = step(source, [token], len(prompt), pages_a, slot_a)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        got[0], reference_logits(reference, [*prompt, token])[-1], atol=1e-4, rtol=0
    )
