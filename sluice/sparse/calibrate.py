"""CETT calibration: per MLP layer, the activation-magnitude threshold whose dropped neurons'
share of the layer's output stays within a target.

CETT (cumulative errors of tail truncation) of a threshold t over tokens x:
mean over tokens of |sum_{|h_j| <= t} h_j d_j| / |sum_j h_j d_j|, with h = silu(gate x) * up x
and d_j the down projection's column j. It grows with t from 0 (nothing dropped) to 1
(everything), so a binary search finds the largest t within the target. The calibration text
runs through the dense model once; each layer's MLP inputs are kept, then searched and (with
`predictor_rank`) used to train that layer's predictor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sluice.models.llama import LlamaMLP
from sluice.models.registry import LoadedModel
from sluice.sparse.predictor import predictor_quality, train_predictor
from sluice.sparse.profile import LayerSparsity, SparsityProfile
from sluice.sparse.store import dense_weight

SEARCH_STEPS = 24
CETT_TOLERANCE = 1e-3  # stop searching once this close to the target
HELD_OUT_SHARE = 0.2  # of the calibration tokens, kept out of predictor training to judge it


def shipped_text() -> str:
    """Public-domain calibration text that ships with Python itself (pydoc's topic help)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def sparse_mlps(model: torch.nn.Module) -> list[LlamaMLP]:
    """The SwiGLU MLP of every layer, in order; ValueError for models with other MLPs."""
    mlps = [getattr(layer, "mlp", None) for layer in model.layers]
    if not all(isinstance(mlp, LlamaMLP) and mlp.layer_index is not None for mlp in mlps):
        raise ValueError(
            "activation sparsity needs a dense SwiGLU MLP in every layer (Llama, Mistral, "
            "SmolLM2, Qwen3); this model has other layers"
        )
    return mlps


def calibrate(
    loaded: LoadedModel,
    token_ids: list[int],
    target_cett: float,
    predictor_rank: int = 0,
    window: int = 512,
    progress: bool = False,
) -> SparsityProfile:
    """Thresholds (and predictors) for `target_cett` from the text `token_ids`."""
    return calibrate_targets(loaded, token_ids, [target_cett], predictor_rank, window, progress)[0]


def calibrate_targets(
    loaded: LoadedModel,
    token_ids: list[int],
    targets: list[float],
    predictor_rank: int = 0,
    window: int = 512,
    progress: bool = False,
    search_tokens: int | None = None,
) -> list[SparsityProfile]:
    """One profile per CETT target, the text run through the model once for all.
    `search_tokens`: search each threshold on that many of the tokens, evenly spaced (each
    search step is a [tokens, I] x [I, hidden] product); sparsity, the CETT reached and the
    predictors use them all."""
    for target in targets:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target CETT must lie in [0, 1), got {target}")
    mlps = sparse_mlps(loaded.model)
    inputs = mlp_inputs(loaded, token_ids, window)
    profiles = [SparsityProfile(t, len(token_ids), [], predictor_rank) for t in targets]
    for mlp, x in tqdm(
        zip(mlps, inputs), total=len(mlps), desc="calibrating", disable=not progress
    ):
        h = activations(mlp, x)
        down = dense_weight(mlp.down_proj).float()
        stride = -(-len(h) // search_tokens) if search_tokens else 1
        for profile in profiles:
            threshold = search_threshold(h[::stride], down, profile.target_cett)
            active = h.abs() > threshold
            sparsity = 1.0 - active.float().mean().item()
            layer = LayerSparsity(threshold, sparsity, cett(h, down, threshold))
            if predictor_rank:
                split = int(len(x) * (1 - HELD_OUT_SHARE))
                predictor = train_predictor(x[:split], active[:split], predictor_rank)
                layer.predictor = predictor_quality(predictor, x[split:], active[split:])
                profile.predictors.append(predictor)
            profile.layers.append(layer)
    return profiles


def activations(mlp: LlamaMLP, x: Tensor) -> Tensor:
    """h = silu(gate) * up [T, I] of MLP inputs x [T, hidden], float32."""
    gate, up = mlp.gate_up_proj(x).float().chunk(2, dim=-1)
    return F.silu(gate) * up


def cett(h: Tensor, down: Tensor, threshold: float, full: Tensor | None = None) -> float:
    """Mean over tokens of |output of the neurons at or below `threshold`| / |full output|;
    h [T, I], down [hidden, I]; `full`: the full output's norms [T], where known."""
    if full is None:
        full = (h @ down.T).norm(dim=-1)
    dropped = (torch.where(h.abs() <= threshold, h, 0.0) @ down.T).norm(dim=-1)
    return (dropped / full.clamp_min(1e-12)).mean().item()


def search_threshold(h: Tensor, down: Tensor, target: float) -> float:
    """The largest threshold (to the search's resolution) whose CETT is at most `target`.
    Bisects the share of neurons dropped (thresholds are quantiles of |h|): most neurons sit
    far below max |h|, so halving that share converges in fewer steps than halving |h|."""
    magnitudes = h.abs().flatten().sort().values
    full = (h @ down.T).norm(dim=-1)
    low, high = 0, len(magnitudes) - 1  # indices: CETT(magnitudes[low]) <= target < ...[high]
    if target == 0.0:
        return 0.0
    for _ in range(SEARCH_STEPS):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        value = cett(h, down, magnitudes[middle].item(), full)
        if value <= target:
            low = middle
            if target - value < CETT_TOLERANCE:
                break
        else:
            high = middle
    return magnitudes[low].item()


@torch.inference_mode()
def mlp_inputs(loaded: LoadedModel, token_ids: list[int], window: int) -> list[Tensor]:
    """Every layer's MLP input [T, hidden] for the text, run in windows of `window` tokens."""
    from sluice.eval.perplexity import perplexity

    mlps = sparse_mlps(loaded.model)
    captured: list[list[Tensor]] = [[] for _ in mlps]
    with _capturing_inputs(mlps, captured):
        perplexity(loaded, token_ids, window)
    return [torch.cat(parts).float() for parts in captured]


@contextmanager
def _capturing_inputs(mlps: list[LlamaMLP], captured: list[list[Tensor]]) -> Iterator[None]:
    hooks = [
        mlp.register_forward_pre_hook(lambda _, args, i=i: captured[i].append(args[0].clone()))
        for i, mlp in enumerate(mlps)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
