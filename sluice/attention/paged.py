"""Attention that reads the pages in place through a paged kernel: the compiled steps' backend.

Every token is a row of the kernel, one query against its sequence's pages up to itself: a
decode's new token, and each token of a prompt's chunk (its own context length), so decodes and
short prompts share one call with no padding, no mask and no gathered copy. A chunk whose prompt
reaches past `KERNEL_MAX_CONTEXT` tokens keeps SDPA (the base class), which shares each key among
the chunk's queries.

The kernel is sluice's own (`kernels/attention_cpu.cpp`, CPUs with AVX-512) or
`paged_decode_attention`, plain tensor ops that inductor compiles so that the gather fuses into
the dot products and the weighted sum. Steps of short queries alone (`DecodeMetadata`: decodes,
speculative verify steps, a row per token) are traced into the compiled decode graph: the cache
writes become in-place scatters into the layer's pools and the kernel fuses with the rest.
Other steps run eagerly (inside the compiled step's opaque operator, `attention/opaque.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sluice.attention.metadata import (
    AttentionGroup,
    AttentionMetadata,
    DecodeMetadata,
    runs_as_decode_rows,
)
from sluice.attention.sdpa import SdpaBackend
from sluice.kernels import attention_cpu

if TYPE_CHECKING:
    from sluice.attention.backend import StepMetadata
    from sluice.cache.kv_cache import KVCache
    from sluice.layers.forward_context import ForwardContext


class PagedBackend(SdpaBackend):
    def __init__(self, native: bool) -> None:
        """`native`: sluice's kernel, else the tensor ops (traced, or compiled on their own)."""
        self.native = native
        self._traced_kernel = attention_cpu.paged_decode if native else paged_decode_attention
        self._eager_kernel = attention_cpu.paged_decode if native else paged_decode_kernel

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> StepMetadata:
        """Steps of short queries (decodes, verify steps) go to the decode graph, as tensors
        only, a row per token."""
        if runs_as_decode_rows(query_lens):
            return DecodeMetadata.build(query_lens, context_lens, page_tables, page_size, device)
        return AttentionMetadata.build(
            query_lens, context_lens, page_tables, page_size, device, paged_kernel=True
        )

    def mark_dynamic(self, meta: StepMetadata) -> None:
        super().mark_dynamic(meta)
        if isinstance(meta, DecodeMetadata):
            torch._dynamo.decorators.mark_unbacked(meta.page_tables, 0)
            torch._dynamo.decorators.mark_unbacked(meta.kv_lens, 0)
            torch._dynamo.mark_dynamic(meta.page_tables, 1)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        if isinstance(ctx.attn, DecodeMetadata):
            return self._decode(layer, q, k, v, scale, ctx.attn, ctx.kv_cache)
        return super().forward(layer, q, k, v, scale, ctx)

    def _decode(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        meta: DecodeMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        """Plain tensor ops on the layer's pools themselves: a graph updates an input in place
        only where it is written whole (indexed by page and offset), not through a view."""
        k_pool, v_pool = cache.pools(layer)
        page_size = k_pool.shape[1]
        index = (meta.slot_mapping // page_size, meta.slot_mapping % page_size)
        k_pool.index_put_(index, k.to(k_pool.dtype))
        v_pool.index_put_(index, v.to(v_pool.dtype))
        out = self._traced_kernel(q, k_pool, v_pool, meta.page_tables, meta.kv_lens, scale)
        return out.to(q.dtype)

    def _attend(
        self, cache: KVCache, layer: int, q: torch.Tensor, group: AttentionGroup, scale: float
    ) -> torch.Tensor:
        if group.kv_lens is None:  # a prompt past the kernel's reach
            return super()._attend(cache, layer, q, group, scale)
        torch._dynamo.decorators.mark_unbacked(q, 0)
        k_pool, v_pool = cache.pools(layer)
        out = self._eager_kernel(q, k_pool, v_pool, group.page_tables, group.kv_lens, scale)
        return out.to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its paged context: q [B, heads, dim], caches [pages,
    page_size, kv_heads, dim], page_tables [B, P], kv_lens [B] -> [B, heads * dim] float32.

    Plain tensor ops, written for inductor: compiled, the page gather fuses into the dot
    products and the weighted sum, so the context is read once in place instead of being copied
    into a padded batch first. Query heads are grouped over KV heads as SDPA's enable_gqa groups
    them.
    """
    num_seqs, num_pages = page_tables.shape
    page_size, kv_heads, dim = k_cache.shape[1:]
    group = q.shape[1] // kv_heads
    queries = q.float().view(num_seqs, 1, 1, kv_heads, group, dim)
    keys = k_cache[page_tables].float().unsqueeze(-2)  # [B, P, page_size, kv_heads, 1, dim]
    scores = (queries * keys).sum(-1) * scale  # [B, P, page_size, kv_heads, group]
    position = torch.arange(num_pages * page_size, device=q.device).view(num_pages, page_size)
    beyond = position.view(1, num_pages, page_size, 1, 1) >= kv_lens.view(-1, 1, 1, 1, 1)
    scores = scores.masked_fill(beyond, float("-inf")).flatten(1, 2)
    probs = torch.softmax(scores, dim=1).view(num_seqs, num_pages, page_size, kv_heads, group, 1)
    values = v_cache[page_tables].float().unsqueeze(-2)
    return (probs * values).sum(dim=(1, 2)).reshape(num_seqs, -1)


# Compiled on its own for the kernel rows of steps that are not decodes alone. Dynamic in rows,
# pages per row and pool size (marked where those tensors are made): one compilation serves all.
paged_decode_kernel = torch.compile(paged_decode_attention, fullgraph=True)
