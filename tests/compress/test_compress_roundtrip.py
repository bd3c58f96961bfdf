"""compress -> write -> load -> generate on a tiny model: the written checkpoint is 2:4 (masks
implied by its zeros), loads onto the 2:4 int4 kernel, and generates what the same weights do
dense."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sluice.api import LLM
from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from sluice.cli import main
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.kernels import sparse24_int4_cpu
from sluice.layers.linear import Linear
from sluice.layers.sparse24 import Sparse24Int4Weight
from sluice.models.registry import load_model
from sluice.sampling_params import SamplingParams

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint("llama", folder, seed=3)
    text = tmp_path_factory.mktemp("text") / "calibration.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"t{i}" for i in torch.randint(3, 512, (600,), generator=g).tolist()))
    return folder, text


def compress(tiny, out, method, *extra):
    folder, text = tiny
    argv = ["compress", "--model", str(folder), "--method", method, "--calibration", str(text)]
    assert main([*argv, "--calibration-tokens", "300", "-o", str(out), *extra]) == 0
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_group_of_four_inputs_has_exactly_two_zeros(tiny, tmp_path, method):
    out = compress(tiny, tmp_path / method, method)
    tensors = load_file(out / "model.safetensors")
    original = load_file(tiny[0] / "model.safetensors")
    assert set(tensors) == set(original)
    for name, tensor in tensors.items():
        if name.rpartition(".")[0].endswith(PROJECTIONS):
            zeros = (tensor.reshape(tensor.shape[0], -1, 4) == 0).sum(dim=-1)
            assert (zeros == 2).all(), name
        else:  # embeddings, norms and the head stay as they were
            assert torch.equal(tensor, original[name]), name
    recorded = json.loads((out / "config.json").read_text())["sluice_compression"]
    assert recorded == {"method": method, "sparsity": "2:4", "quantize": None, "group_size": 32}


@pytest.mark.skipif(not sparse24_int4_cpu.available(), reason="the 2:4 int4 kernel needs AVX2")
def test_int4_checkpoint_loads_on_the_kernel_and_generates_as_its_dense_weights(tiny, tmp_path):
    out = compress(tiny, tmp_path / "sparsegpt-int4", "sparsegpt", "--quantize", "int4")
    cpu = torch.device("cpu")
    sparse = load_model(out, cpu, torch.float32, "auto")
    dense = load_model(out, cpu, torch.float32, "none")
    pairs = [
        (m, dense.model.get_submodule(name))
        for name, m in sparse.model.named_modules()
        if isinstance(m, Linear) and m is not sparse.model.quantized_head
    ]
    assert len(pairs) == 2 * 4
    for kernel, reference in pairs:
        assert isinstance(kernel.qweight, Sparse24Int4Weight)
        assert torch.equal(kernel.qweight.dequantize(), reference.weight)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = ["t5 t9 t100 t42", "t7 t7 t300"]

    def generate(loaded):
        engine = Engine(EngineConfig.create(model=str(out), compile=False), loaded=loaded)
        return [r.outputs[0].token_ids for r in LLM.from_engine(engine).generate(prompts, params)]

    assert generate(sparse) == generate(dense)


def test_int4_needs_2_of_4(tiny, tmp_path, capsys):
    argv = ["compress", "--model", str(tiny[0]), "--method", "magnitude"]
    argv += ["--sparsity", "unstructured:0.5", "--quantize", "int4", "-o", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "--quantize int4 needs --sparsity 2:4" in capsys.readouterr().err
