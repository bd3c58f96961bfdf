"""Perplexity of a text under a loaded model: the quality gate for quantized, sparse and fast
paths. Sliding windows (as transformers' perplexity guide): each window of up to `window` tokens
starts `stride` after the last and scores only the tokens no earlier window scored, so with a
stride below the window every scored token sees at least `window - stride` tokens of context."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sluice.eval.forward import prompts_hidden
from sluice.models.registry import LoadedModel

if TYPE_CHECKING:
    from sluice.sparse.decoding import SparseDecoding


@torch.inference_mode()
def perplexity(
    loaded: LoadedModel,
    token_ids: list[int],
    window: int = 512,
    stride: int | None = None,
    progress: bool = False,
    sparse: SparseDecoding | None = None,
) -> float:
    """exp(mean negative log-likelihood) of every token after the first; `stride` defaults to
    `window` (windows side by side). With `sparse`, every token's MLPs run as a sparse decode
    would run them."""
    stride = window if stride is None else stride
    if not 0 < stride <= window:
        raise ValueError(f"stride must lie in [1, window = {window}], got {stride}")
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    model = loaded.model
    last = len(token_ids) - 1  # the last position with a target
    nll, scored = 0.0, 0  # targets at positions 1..scored are done
    bar = tqdm(total=last, unit="tok", desc="perplexity", disable=not progress)
    for start in range(0, last, stride):
        end = min(start + window, last)
        new = end - scored
        hidden = prompts_hidden(model, [token_ids[start:end]], sparse)[0][-new:]
        targets = torch.tensor(token_ids[scored + 1 : end + 1], device=hidden.device)
        nll += F.cross_entropy(model.compute_logits(hidden), targets, reduction="sum").item()
        scored = end
        bar.update(new)
        if end == last:
            break
    bar.close()
    return math.exp(nll / last)
