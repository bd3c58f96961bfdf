"""Activation-sparse MLPs (sluice/sparse/) on a tiny random Llama: CETT calibration, the sparse
MLP against dense references, the weight cache, statistical top-k and the predictor path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint
from sluice.models.registry import load_model
from sluice.sparse.calibrate import CETT_TOLERANCE, activations, calibrate, cett
from sluice.sparse.decoding import SparseDecoding
from sluice.sparse.predictor import LowRankPredictor
from sluice.sparse.profile import LayerSparsity, SparsityProfile
from sluice.sparse.store import DenseNeuronStore, Int4NeuronStore, dense_weight, neuron_store
from sluice.sparse.topk import statistical_top_k_mask
from sluice.sparse.weight_cache import WeightCache

TARGETS = (0.05, 0.1, 0.2, 0.3)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_checkpoint("llama", folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_model(tiny_folder, torch.device("cpu"), torch.float32, quantization="none")


@pytest.fixture(scope="module")
def tiny_int4(tiny_folder):
    return load_model(tiny_folder, torch.device("cpu"), torch.float32, quantization="int4")


def text_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(
        3, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def mlp_input(model, rows: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, model.config.hidden_size, generator=generator)


def profile_of(thresholds: list[float]) -> SparsityProfile:
    return SparsityProfile(0.0, 0, [LayerSparsity(t, 0.0, 0.0) for t in thresholds])


def test_cett_of_the_thresholds_meets_each_target_and_grows_with_it(tiny):
    profiles = [calibrate(tiny, text_ids(384), target) for target in TARGETS]
    for target, profile in zip(TARGETS, profiles):
        for layer in profile.layers:
            assert target - CETT_TOLERANCE <= layer.cett <= target
            assert 0.0 < layer.sparsity < 1.0
    for i in range(len(profiles[0].layers)):
        thresholds = [p.layers[i].threshold for p in profiles]
        sparsities = [p.layers[i].sparsity for p in profiles]
        assert thresholds == sorted(thresholds) and len(set(thresholds)) == len(TARGETS)
        assert sparsities == sorted(sparsities)


def test_cett_is_the_dropped_share_of_the_output():
    """By hand on two tokens: dropping neuron 0 of h = [[1, 3], [2, 0.5]] with down columns
    (1, 0) and (0, 1) leaves errors (1, 0) of |(1, 3)| and (0, 0)... each token its ratio."""
    h = torch.tensor([[1.0, 3.0], [2.0, 0.5]])
    down = torch.eye(2)
    expected = (1 / 10**0.5 + 0.5 / 4.25**0.5) / 2  # token 2 drops its 0.5 (neuron 1)
    assert cett(h, down, 1.0) == pytest.approx(expected, rel=1e-6)
    assert cett(h, down, 0.0) == 0.0


def dequantized_mlp(mlp, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The dense reference in fp32 over the weights as stored, masking |h| <= threshold."""
    gate, up = (x @ dense_weight(mlp.gate_up_proj).T).chunk(2, dim=-1)
    h = F.silu(gate) * up
    return torch.where(h.abs() > threshold, h, 0.0) @ dense_weight(mlp.down_proj).T


def threshold_between(h: torch.Tensor, quantile: float) -> float:
    """A threshold midway between two neighbouring |h|: far from every value, so rounding
    differences between the paths cannot move a neuron across it."""
    values = h.abs().flatten().sort().values
    i = int(quantile * len(values))
    return ((values[i] + values[i + 1]) / 2).item()


@pytest.mark.parametrize("quantized", [False, True])
def test_store_with_every_neuron_equals_dense_and_with_a_threshold_the_masked_dense(
    tiny, tiny_int4, quantized
):
    model = (tiny_int4 if quantized else tiny).model
    for mlp in (layer.mlp for layer in model.layers):
        store = neuron_store(mlp.gate_up_proj, mlp.down_proj)
        assert isinstance(store, Int4NeuronStore if quantized else DenseNeuronStore)
        x = mlp_input(model)[0]
        everyone = torch.arange(mlp.down_proj.in_features)
        h_ref = activations(mlp, x.unsqueeze(0))[0]
        for threshold in (-1.0, threshold_between(h_ref, 0.5)):
            h = store.gate_up(x, store.neuron_tensors, everyone, threshold)
            got = store.down(h, store.neuron_tensors, everyone, everyone)
            expected = dequantized_mlp(mlp, x, threshold)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            if threshold < 0:
                assert torch.count_nonzero(h) == len(everyone)
            else:  # the down projection over only the kept neurons, in any order
                kept = torch.nonzero(h).flatten().flip(0)
                got = store.down(h[kept], store.neuron_tensors, kept, kept)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sparse_decoding_every_neuron_equals_dense_and_a_threshold_the_masked_dense(tiny):
    model = tiny.model
    x = mlp_input(model, rows=1)
    everything = SparseDecoding(model, profile_of([-1.0] * len(model.layers)), "threshold")
    hs = [activations(layer.mlp, x)[0] for layer in model.layers]
    thresholds = [threshold_between(h, 0.6) for h in hs]
    masked = SparseDecoding(model, profile_of(thresholds), "threshold")
    for i, layer in enumerate(model.layers):
        torch.testing.assert_close(
            everything.forward(i, x), layer.mlp.dense(x), rtol=1e-5, atol=1e-5
        )
        expected = dequantized_mlp(layer.mlp, x[0], thresholds[i]).unsqueeze(0)
        torch.testing.assert_close(masked.forward(i, x), expected, rtol=1e-5, atol=1e-5)
    assert 0.55 < masked.mean_sparsity() < 0.65


def test_predictor_with_recall_forced_to_one_equals_the_threshold_path(tiny):
    model, width = tiny.model, tiny.config.intermediate_size
    profile = calibrate(tiny, text_ids(256), 0.1)
    threshold = SparseDecoding(model, profile, "threshold")
    profile.predictors = [
        LowRankPredictor.always_active(tiny.config.hidden_size, width) for _ in model.layers
    ]
    predicted = SparseDecoding(model, profile, "predictor", weight_cache=True)
    for seed in range(4):  # consecutive tokens through each layer's weight cache
        x = mlp_input(model, seed=seed)
        for i in range(len(model.layers)):
            torch.testing.assert_close(
                predicted.forward(i, x), threshold.forward(i, x), rtol=1e-5, atol=1e-5
            )
    assert predicted.mean_sparsity() == pytest.approx(threshold.mean_sparsity())


@pytest.mark.parametrize("rule", ["threshold", "predictor", "topk"])
def test_every_row_evaluation_equals_the_sparse_decodes(tiny, rule):
    """Perplexity runs every row's masks through the dense kernels at once: the same result
    as each row decoded sparse on its own."""
    model = tiny.model
    profile = calibrate(tiny, text_ids(384), 0.1, predictor_rank=4)
    sparse = SparseDecoding(model, profile, rule)
    x = mlp_input(model, rows=5)
    for i in range(len(model.layers)):
        each = torch.cat([sparse.forward(i, row.unsqueeze(0)) for row in x])
        torch.testing.assert_close(sparse.every_row().forward(i, x), each, rtol=1e-5, atol=1e-5)


def test_predictor_trained_in_calibration_reports_its_quality(tiny):
    profile = calibrate(tiny, text_ids(512), 0.1, predictor_rank=8)
    assert len(profile.predictors) == len(profile.layers)
    for layer in profile.layers:
        assert 0.5 < layer.predictor.recall <= 1.0
        assert 0.0 < layer.predictor.precision <= 1.0


def test_profile_round_trips_through_its_files(tiny, tmp_path):
    profile = calibrate(tiny, text_ids(256), 0.2, predictor_rank=4)
    path = tmp_path / "sparsity.json"
    profile.save(path)
    loaded = SparsityProfile.load(path)
    assert loaded.layers == profile.layers
    for got, saved in zip(loaded.predictors, profile.predictors):
        assert torch.equal(got.up, saved.up) and torch.equal(got.bias, saved.bias)
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError, match="version 99"):
        SparsityProfile.load(path)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sets(st.integers(0, 39)), min_size=1, max_size=8))
def test_weight_cache_holds_exactly_the_current_set(sets):
    source = [torch.arange(40 * 3).view(40, 3), torch.arange(40).float().mul(-1)]
    cache = WeightCache(source)
    for active in sets:
        neurons = torch.tensor(sorted(active), dtype=torch.long)
        placed = cache.update(neurons[torch.randperm(len(neurons))])
        assert sorted(placed.tolist()) == sorted(active)
        for slots, tensor in zip(cache.slots, source):
            assert torch.equal(slots[: len(placed)], tensor[placed])
        assert torch.equal(torch.nonzero(cache.slot_of >= 0).flatten(), neurons)


def test_weight_cache_moves_only_what_changed():
    cache = WeightCache([torch.arange(100).float()])
    cache.update(torch.arange(0, 50))
    before = cache.rows_moved
    cache.update(torch.arange(5, 55))  # 5 leave, 5 enter
    assert cache.rows_moved - before == 5


@pytest.mark.parametrize("keep", [0.05, 0.25, 0.5, 0.8])
def test_statistical_top_k_keeps_about_k_of_d_gaussian_activations(keep):
    gate = torch.randn(64, 8192, generator=torch.Generator().manual_seed(0)) * 3 + 1
    kept = statistical_top_k_mask(gate, keep).float().mean(dim=-1)
    assert kept.mean().item() == pytest.approx(keep, abs=0.01)
    assert (kept - keep).abs().max().item() < 0.03
