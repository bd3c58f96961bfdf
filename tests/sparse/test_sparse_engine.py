"""Engines decoding with `--sparsity`: at CETT 0 the greedy output is the dense one, eagerly and
through the compiled step; pages free after every test; the calibration command writes a
profile the engine loads."""

from __future__ import annotations

import pytest
import torch
from model_harness import assert_no_leaks, token_ids

from sluice import SamplingParams
from sluice.api import LLM
from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from sluice.cli import main
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.models.registry import load_model
from sluice.sparse.profile import LayerSparsity, SparsityProfile

pytestmark = pytest.mark.slow

PROMPTS = ["Name three rivers.", "What is 12 times 7?", "Write a haiku about rain."]


def cett_zero_profile(num_layers: int, path) -> str:
    """CETT 0 drops nothing: threshold 0 keeps every neuron with a nonzero activation."""
    SparsityProfile(0.0, 0, [LayerSparsity(0.0, 0.0, 0.0)] * num_layers).save(path)
    return str(path)


def test_greedy_output_at_cett_zero_equals_dense(make_llm, default_model, tmp_path):
    profile = cett_zero_profile(default_model.config.num_layers, tmp_path / "cett0.json")
    dense = make_llm(compile=False)
    sparse = make_llm(compile=False, sparsity=profile)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [dense.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    expected = token_ids(dense.generate(prompts, params))
    for prompt, ids in zip(prompts, expected):  # one stream at a time: sparse decodes
        assert token_ids(sparse.generate([prompt], params)) == [ids]
    assert token_ids(sparse.generate(prompts, params)) == expected  # a batch: dense MLPs
    runner = sparse.engine.executor
    assert runner.sparse.layers[0].tokens == 3 * 23  # every decode of the lone streams
    assert runner.sparse.mean_sparsity() < 0.01


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama", folder, hidden_size=128, intermediate_size=256)
    return folder


def test_calibrated_profile_decodes_alike_compiled_and_eager(tiny_folder, tmp_path):
    """`sluice calibrate-sparsity` on the int4 tiny model, then the sparse decode (predictors:
    the gathered int4 kernels and the weight cache) through the compiled step's operator and
    eagerly: the same greedy tokens, the same neurons skipped, pages free."""
    text = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"t{i}" for i in torch.randint(3, 512, (600,), generator=generator)))
    profile = tmp_path / "sparsity.json"
    argv = ["calibrate-sparsity", "--model", str(tiny_folder), "--quantization", "int4"]
    argv += ["--cett", "0.1", "--text", str(text), "--tokens", "512", "--predictor-rank", "8"]
    assert main([*argv, "-o", str(profile)]) == 0
    assert SparsityProfile.load(profile).predictors
    loaded = load_model(tiny_folder, torch.device("cpu"), torch.float32, quantization="int4")
    outputs, engines = [], []
    for compile in (True, False):
        config = EngineConfig.create(
            quantization="int4", sparsity=str(profile), compile=compile, kv_cache_dtype="float32"
        )
        engine = Engine(config, loaded=loaded)
        engines.append(engine)
        llm = LLM.from_engine(engine)
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        outputs.append([token_ids(llm.generate([[5, 9, 33, 7]], params))])
        assert engine.executor.sparse.rule == "predictor"
    assert outputs[0] == outputs[1]
    compiled, eager = (e.executor.sparse for e in engines)
    assert eager.layers[0].tokens == 11
    assert compiled.layers[0].tokens == 11 + 1  # and the compile's one-decode capture step
    assert 0.1 < eager.mean_sparsity() == pytest.approx(compiled.mean_sparsity(), abs=0.02)
    for engine in engines:
        assert_no_leaks(engine)


def test_bad_profile_is_refused_with_its_reason(default_model, tmp_path):
    profile = cett_zero_profile(3, tmp_path / "short.json")
    with pytest.raises(ValueError, match="profile has 3 layers, the model 30"):
        Engine(EngineConfig.create(quantization="none", sparsity=profile), loaded=default_model)
    with pytest.raises(ValueError, match="cannot read sparsity profile"):
        Engine(
            EngineConfig.create(quantization="none", sparsity=str(tmp_path / "missing.json")),
            loaded=default_model,
        )
