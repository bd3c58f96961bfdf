"""Sparse MLPs at decode time: per layer, which neurons a token computes and how.

Three rules pick a decode token's neurons in a layer:
- "threshold" (CETT-calibrated): gate and up run dense, the down projection only over the
  neurons with |silu(gate) * up| above the layer's threshold (a third of the MLP's weights);
- "predictor" (Deja Vu): the layer's low-rank predictor names the neurons from the MLP input,
  and only their gate, up and down weights are read (the threshold still drops the predicted
  neurons that turn out small);
- "topk" (Gemma 3n's statistical top-k): gate and up dense, the neurons whose gate exceeds
  mean + std * z(1 - k/d), k/d the layer's calibrated share of neurons kept.

Only steps of decodes alone, of at most `max_rows` rows, are sparse (each row its own set; the
union of many rows' sets approaches the whole layer): prefill chunks and wide batches run the
dense MLP. In a compiled step the sparse MLP is one opaque operator,
`sluice::sparse_mlp(x, layer)`, which runs this module eagerly against the `SparseDecoding`
the compiled step installs around the graph's call (as attention/opaque.py does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sluice.sparse.calibrate import sparse_mlps
from sluice.sparse.predictor import LowRankPredictor
from sluice.sparse.profile import SparsityProfile
from sluice.sparse.store import NeuronStore, neuron_store
from sluice.sparse.topk import statistical_top_k_mask
from sluice.sparse.weight_cache import WeightCache

Rule = Literal["auto", "threshold", "predictor", "topk"]
RULES = ("auto", "threshold", "predictor", "topk")
DEFAULT_MAX_ROWS = 1


@dataclass
class SparseLayer:
    mlp: torch.nn.Module  # the dense LlamaMLP: its weights, and the dense path
    store: NeuronStore
    threshold: float
    keep_fraction: float
    predictor: LowRankPredictor | None
    cache: WeightCache | None
    tokens: int = 0  # sparse tokens run, and the neurons they kept, for the statistics
    kept: int = 0


class SparseDecoding:
    def __init__(
        self,
        model: torch.nn.Module,
        profile: SparsityProfile,
        rule: Rule = "auto",
        weight_cache: bool = False,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        mlps = sparse_mlps(model)
        if len(profile.layers) != len(mlps):
            raise ValueError(
                f"sparsity profile has {len(profile.layers)} layers, the model {len(mlps)}"
            )
        if rule not in RULES:
            raise ValueError(f"sparsity rule must be one of {RULES}, got {rule!r}")
        if rule == "auto":
            rule = "predictor" if profile.predictors else "threshold"
        if rule == "predictor" and not profile.predictors:
            raise ValueError("sparsity rule 'predictor' needs a profile calibrated with predictors")
        self.rule = rule
        self.profile = profile
        self.max_rows = max_rows
        self.all_rows = False  # True: every row sparse, decode or not (for evaluation)
        self.layers = [self._layer(mlp, i, weight_cache) for i, mlp in enumerate(mlps)]

    def _layer(self, mlp: torch.nn.Module, index: int, weight_cache: bool) -> SparseLayer:
        store = neuron_store(mlp.gate_up_proj, mlp.down_proj)
        calibrated = self.profile.layers[index]
        predictor = self.profile.predictors[index] if self.rule == "predictor" else None
        cache = WeightCache(store.neuron_tensors) if weight_cache else None
        return SparseLayer(
            mlp, store, calibrated.threshold, 1.0 - calibrated.sparsity, predictor, cache
        )

    def every_row(self) -> SparseDecoding:
        """This decoding's masks applied to every row of any step, through the dense kernels:
        the perplexity of the sparse model at the cost of a dense pass (the sparse kernels
        compute the same masked product; tests/sparse)."""
        return self._with(all_rows=True)

    def dense_rows(self) -> SparseDecoding:
        """This decoding with every row dense (for steps that are not decodes alone), but for
        `every_row`'s masks."""
        return self._with(max_rows=0)

    def _with(self, **changes: object) -> SparseDecoding:
        clone = object.__new__(SparseDecoding)
        clone.__dict__.update(self.__dict__, **changes)
        return clone

    def _masked_dense(self, layer: SparseLayer, x: Tensor) -> Tensor:
        gate, up = layer.mlp.gate_up_proj(x).float().chunk(2, dim=-1)
        h = F.silu(gate) * up
        if self.rule == "topk":
            keep = statistical_top_k_mask(gate, layer.keep_fraction)
        else:
            keep = h.abs() > layer.threshold
        if self.rule == "predictor":
            keep &= layer.predictor.logits(x.float()) > 0
        layer.tokens += x.shape[0]
        layer.kept += int(keep.sum())
        return layer.mlp.down_proj(torch.where(keep, h, 0.0).to(x.dtype))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP of layer `layer` over the step's rows x [R, hidden]."""
        if torch.compiler.is_compiling():
            return torch.ops.sluice.sparse_mlp(x, layer)
        return self.forward(layer, x)

    def forward(self, layer: int, x: Tensor) -> Tensor:
        state = self.layers[layer]
        if self.all_rows:
            return self._masked_dense(state, x)
        if x.shape[0] > self.max_rows:
            return state.mlp.dense(x)
        rows = [self._row(state, row) for row in x.float()]
        return torch.stack(rows).to(x.dtype)

    def _row(self, layer: SparseLayer, x: Tensor) -> Tensor:
        if self.rule == "predictor":
            tensors, rows, neurons = self._placed(layer, layer.predictor.active(x))
            h = layer.store.gate_up(x, tensors, rows, layer.threshold)
            layer.kept += int(torch.count_nonzero(h))
        else:
            h, keep = self._dense_activations(layer, x)
            tensors, rows, neurons = self._placed(layer, torch.nonzero(keep).flatten())
            h = h[neurons]
            layer.kept += len(neurons)
        layer.tokens += 1
        return layer.store.down(h, tensors, rows, neurons)

    def _dense_activations(self, layer: SparseLayer, x: Tensor) -> tuple[Tensor, Tensor]:
        """h of every neuron, and which to keep (the threshold or the statistical top-k)."""
        if self.rule == "topk":
            gate, up = layer.mlp.gate_up_proj(x.unsqueeze(0)).float().squeeze(0).chunk(2)
            return F.silu(gate) * up, statistical_top_k_mask(gate, layer.keep_fraction)
        store = layer.store
        h = store.gate_up(x, store.neuron_tensors, store.every_neuron, layer.threshold)
        return h, h != 0

    @staticmethod
    def _placed(layer: SparseLayer, neurons: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Where the kernels find `neurons`: (tensors, rows in them, the neuron at each row)."""
        if layer.cache is None:
            return layer.store.neuron_tensors, neurons, neurons
        placed = layer.cache.update(neurons)
        return layer.cache.slots, torch.arange(len(placed)), placed

    def layer_stats(self) -> list[dict]:
        """Per layer: the share of neurons skipped by the sparse tokens run so far, and the
        predictor's recall and precision on held-out calibration tokens."""
        stats = []
        for i, layer in enumerate(self.layers):
            quality = self.profile.layers[i].predictor
            stats.append(
                {
                    "layer": i,
                    "sparsity": 1.0 - layer.kept / max(1, layer.tokens * _width(layer)),
                    "calibrated_sparsity": self.profile.layers[i].sparsity,
                    "predictor_recall": quality.recall if quality else None,
                    "predictor_precision": quality.precision if quality else None,
                }
            )
        return stats

    def mean_sparsity(self) -> float:
        stats = self.layer_stats()
        return sum(s["sparsity"] for s in stats) / len(stats)


def _width(layer: SparseLayer) -> int:
    return layer.store.neuron_tensors[0].shape[0]


# --- the opaque operator of compiled steps ----------------------------------------------------
_installed: SparseDecoding | None = None


@contextmanager
def installed(sparse: SparseDecoding | None) -> Iterator[None]:
    """Make `sparse` the operator's decoding for the duration of a compiled forward."""
    global _installed
    _installed = sparse
    try:
        yield
    finally:
        _installed = None


def _sparse_mlp(x: Tensor, layer: int) -> Tensor:
    if _installed is None:
        raise RuntimeError("sluice::sparse_mlp called outside sparse.decoding.installed()")
    return _installed.forward(layer, x)


def _sparse_mlp_shape(x: Tensor, layer: int) -> Tensor:
    return torch.empty_like(x)


# Through the dispatcher directly, as sluice::paged_attention: one call per layer and step.
_library = torch.library.Library("sluice", "FRAGMENT")
_library.define("sparse_mlp(Tensor x, int layer) -> Tensor")
_library.impl("sparse_mlp", _sparse_mlp, "CompositeExplicitAutograd")
torch.library.register_fake("sluice::sparse_mlp", _sparse_mlp_shape, lib=_library)
