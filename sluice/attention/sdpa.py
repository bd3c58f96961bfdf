"""Attention by SDPA over pages gathered per request: the eager steps' backend.

Every layer writes the step's K/V into its pages through the slot mapping, gathers each request's
context through its page table and runs SDPA over queries padded per request. Requests share a
call only with requests whose query and key lengths are each within a factor of two
(`AttentionMetadata`), so neither a long chunk nor a long context pads the short ones. The pools
may hold a narrower dtype than the queries (a 16-bit cache for an fp32 model): keys and values
are widened as they are read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sluice.attention.backend import AttentionBackend
from sluice.attention.metadata import AttentionGroup, AttentionMetadata

if TYPE_CHECKING:
    from sluice.cache.kv_cache import KVCache
    from sluice.layers.forward_context import ForwardContext


class SdpaBackend(AttentionBackend):
    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        return AttentionMetadata.build(query_lens, context_lens, page_tables, page_size, device)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        meta, cache = ctx.attn, ctx.kv_cache
        _write(cache, layer, k, v, meta.slot_mapping)
        if len(meta.groups) == 1:  # all decodes or all prefills: every token, in step order
            return self._attend(cache, layer, q, meta.groups[0], scale)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for group in meta.groups:
            out[group.token_index] = self._attend(cache, layer, q[group.token_index], group, scale)
        return out

    def _attend(
        self, cache: KVCache, layer: int, q: torch.Tensor, group: AttentionGroup, scale: float
    ) -> torch.Tensor:
        if group.slot_range is not None and group.max_query_len == 1:
            return _attend_slice(cache, layer, q, *group.slot_range, scale)
        keys = _gather(cache, layer, 0, group).to(q.dtype)
        values = _gather(cache, layer, 1, group).to(q.dtype)
        queries = _pad_queries(q, group)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(group.num_seqs * group.max_query_len, -1)
        return out if group.max_query_len == 1 else out[group.query_scatter]


def _write(
    cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    k_slots, v_slots = cache.slots(layer)
    k_slots.index_copy_(0, slots, k.to(k_slots.dtype))
    v_slots.index_copy_(0, slots, v.to(v_slots.dtype))


def _attend_slice(
    cache: KVCache, layer: int, q: torch.Tensor, start: int, stop: int, scale: float
) -> torch.Tensor:
    """One decoding sequence whose keys are the pool's slots [start, stop): no copies, and the
    fewest calls (this runs once per layer per token of a single stream)."""
    k_slots, v_slots = cache.slots(layer)
    out = F.scaled_dot_product_attention(
        q.reshape(q.shape[1], 1, q.shape[2]),
        k_slots[start:stop].transpose(0, 1).to(q.dtype),
        v_slots[start:stop].transpose(0, 1).to(q.dtype),
        scale=scale,
        enable_gqa=True,
    )
    return out.view(1, -1)


def _gather(cache: KVCache, layer: int, which: int, group: AttentionGroup) -> torch.Tensor:
    """[B, kv_heads, kv, dim] keys (`which` 0) or values (1) of the group's sequences."""
    if group.slot_range is not None:
        slots = cache.slots(layer)[which]
        return slots[slice(*group.slot_range)].transpose(0, 1).unsqueeze(0)
    pages = cache.pools(layer)[which][group.page_tables]  # [B, pages, page_size, kv_heads, dim]
    return pages.flatten(1, 2)[:, : group.max_kv_len].transpose(1, 2)


def _pad_queries(q: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    if group.max_query_len == 1:  # decodes: one query each, already in group order
        return q.unsqueeze(2)  # [B, heads, 1, dim]
    num_heads, head_dim = q.shape[1:]
    padded = q.new_zeros(group.num_seqs * group.max_query_len, num_heads, head_dim)
    padded[group.query_scatter] = q.to(padded.dtype)
    shape = (group.num_seqs, group.max_query_len, num_heads, head_dim)
    return padded.view(shape).transpose(1, 2)
