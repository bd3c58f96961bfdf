"""Run whole token sequences through a loaded model as prompts, outside the engine: what the
evaluation harness and calibration need (every position's hidden state, no sampling)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sluice.attention.sdpa import SdpaBackend
from sluice.cache.kv_cache import KVCache
from sluice.layers.forward_context import ForwardContext
from sluice.models.base import CausalLM

if TYPE_CHECKING:
    from sluice.sparse.decoding import SparseDecoding

PAGE_SIZE = 16


def prompts_context(model: CausalLM, sequences: list[list[int]]) -> ForwardContext:
    """A context that runs each sequence as its own prompt, over pages of its own, in one
    forward pass."""
    device = model.norm.weight.device
    pages = [-(-len(seq) // PAGE_SIZE) for seq in sequences]
    kv_cache = KVCache.allocate(
        model.config, sum(pages), PAGE_SIZE, model.embed_tokens.dtype, device
    )
    starts = [sum(pages[:i]) for i in range(len(pages))]
    tables = [list(range(start, start + n)) for start, n in zip(starts, pages, strict=True)]
    lens = [len(seq) for seq in sequences]
    return ForwardContext.build(SdpaBackend(), kv_cache, lens, [0] * len(lens), tables, device)


@torch.inference_mode()
def prompts_hidden(
    model: CausalLM, sequences: list[list[int]], sparse: SparseDecoding | None = None
) -> list[Tensor]:
    """The final hidden states of every position of each sequence, [len, hidden] each; with
    `sparse`, every token's MLPs run as a sparse decode would run them."""
    ctx = prompts_context(model, sequences)
    if sparse is not None:
        ctx = dataclasses.replace(ctx, sparse=sparse.every_row())
    device = model.norm.weight.device
    ids = torch.tensor([t for seq in sequences for t in seq], device=device)
    return list(model(ids, ctx).split([len(seq) for seq in sequences]))


@torch.inference_mode()
def continuations_hidden(
    model: CausalLM, prefix: list[int], continuations: list[list[int]]
) -> tuple[Tensor, list[Tensor]]:
    """The hidden states of `prefix`, computed once, and of each continuation after it: the
    continuations run side by side over the prefix's pages (one token a page, so none shares a
    page it writes)."""
    device = model.norm.weight.device
    total = len(prefix) + sum(len(c) for c in continuations)
    kv_cache = KVCache.allocate(model.config, total, 1, model.embed_tokens.dtype, device)
    shared = list(range(len(prefix)))
    ctx = ForwardContext.build(SdpaBackend(), kv_cache, [len(prefix)], [0], [shared], device)
    prefix_hidden = model(torch.tensor(prefix, device=device), ctx)
    tables, next_page = [], len(prefix)
    for continuation in continuations:
        tables.append(shared + list(range(next_page, next_page + len(continuation))))
        next_page += len(continuation)
    lens = [len(c) for c in continuations]
    ctx = ForwardContext.build(
        SdpaBackend(), kv_cache, lens, [len(prefix)] * len(lens), tables, device
    )
    ids = torch.tensor([t for c in continuations for t in c], device=device)
    return prefix_hidden, list(model(ids, ctx).split(lens))
