"""Grouped-query attention over a paged KV cache.

Each layer writes this step's K/V into its pages (through `slot_mapping`), then every request's
queries attend to that request's whole context, gathered through its page table. Queries are
padded per request to [num_seqs, max_query_len] so one SDPA call serves a mixed batch of
prefill chunks and decodes; the mask is built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each flat token in its sequence
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V goes to
    page_tables: torch.Tensor  # [B, pages] page ids, padded with 0
    query_scatter: torch.Tensor  # [T] index of each flat token in the padded [B * max_query_len]
    mask: torch.Tensor  # [B, 1, max_query_len, max_kv_len] True where a query may attend
    num_seqs: int
    max_query_len: int
    max_kv_len: int

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """`context_lens[i]`: tokens of request i already cached before this step."""
        num_seqs, max_q = len(query_lens), max(query_lens)
        kv_lens = [c + q for c, q in zip(context_lens, query_lens)]
        max_kv = max(kv_lens)
        pages = -(-max_kv // page_size)
        table = torch.zeros(num_seqs, pages, dtype=torch.long)
        for i, row in enumerate(page_tables):
            n = min(len(row), pages)
            table[i, :n] = torch.tensor(row[:n], dtype=torch.long)
        q_lens = torch.tensor(query_lens)
        ctx = torch.tensor(context_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
        offset_in_seq = torch.arange(int(q_lens.sum())) - torch.repeat_interleave(
            torch.cumsum(q_lens, 0) - q_lens, q_lens
        )
        positions = ctx[seq_of_token] + offset_in_seq
        slot_mapping = (
            table[seq_of_token, positions // page_size] * page_size + positions % page_size
        )
        query_pos = torch.zeros(num_seqs, max_q, dtype=torch.long)
        query_pos.view(-1)[seq_of_token * max_q + offset_in_seq] = positions
        key_pos = torch.arange(max_kv)
        mask = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)
        return cls(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            page_tables=table.to(device),
            query_scatter=(seq_of_token * max_q + offset_in_seq).to(device),
            mask=mask.unsqueeze(1).to(device),
            num_seqs=num_seqs,
            max_query_len=max_q,
            max_kv_len=max_kv,
        )


class PagedAttention(nn.Module):
    """Softmax attention for one layer; `kv_cache` is bound by the model runner after loading."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # [num_pages, page_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]; returns [T, heads * dim]."""
        self._write_cache(k, v, meta.slot_mapping)
        keys, values = self._gather_context(meta)
        queries = self._pad_queries(q, meta)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(meta.num_seqs * meta.max_query_len, -1)
        return out[meta.query_scatter]

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        self.k_cache.view(flat_shape).index_copy_(0, slots, k.to(self.k_cache.dtype))
        self.v_cache.view(flat_shape).index_copy_(0, slots, v.to(self.v_cache.dtype))

    def _gather_context(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        def gather(cache: torch.Tensor) -> torch.Tensor:
            pages = cache[meta.page_tables]  # [B, pages, page_size, kv_heads, dim]
            flat = pages.flatten(1, 2)[:, : meta.max_kv_len]
            return flat.transpose(1, 2)  # [B, kv_heads, max_kv, dim]

        return gather(self.k_cache), gather(self.v_cache)

    def _pad_queries(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        padded = q.new_zeros(meta.num_seqs * meta.max_query_len, self.num_heads, self.head_dim)
        padded[meta.query_scatter] = q.to(padded.dtype)
        return padded.view(
            meta.num_seqs, meta.max_query_len, self.num_heads, self.head_dim
        ).transpose(1, 2)
