"""Perplexity of a text under a loaded model: the quality gate for quantized and fast paths."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from sluice.attention.sdpa import SdpaBackend
from sluice.cache.kv_cache import KVCache
from sluice.layers.forward_context import ForwardContext
from sluice.models.registry import LoadedModel

if TYPE_CHECKING:
    from sluice.sparse.decoding import SparseDecoding


@torch.inference_mode()
def perplexity(
    loaded: LoadedModel,
    token_ids: list[int],
    window: int = 512,
    sparse: SparseDecoding | None = None,
) -> float:
    """exp(mean negative log-likelihood) of every token after the first, in windows of `window`.
    With `sparse`, every token's MLPs run as a sparse decode would run them."""
    model = loaded.model
    device = next(model.parameters()).device
    dtype = model.embed_tokens.dtype
    page_size = 16
    num_pages = -(-window // page_size)
    kv_cache = KVCache.allocate(model.config, num_pages, page_size, dtype, device)
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window + 1]
        ctx = ForwardContext.build(
            SdpaBackend(), kv_cache, [len(chunk) - 1], [0], [list(range(num_pages))], device
        )
        if sparse is not None:
            ctx = dataclasses.replace(ctx, sparse=sparse.every_row())
        logits = model.compute_logits(model(torch.tensor(chunk[:-1], device=device), ctx))
        targets = torch.tensor(chunk[1:], device=device)
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)
