"""Grouped-query attention over a paged KV cache.

Each layer writes this step's K/V into its pages (through `slot_mapping`), then every request's
queries attend to that request's whole context, gathered through its page table. Requests are
grouped by query length: decodes (one query each) share one SDPA call, prefill chunks share
another with queries padded to the longest chunk, so a long chunk never pads the decodes.
Masks and indices are built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionGroup:
    """Requests that share one padded SDPA call."""

    token_index: torch.Tensor  # [Tg] the group's tokens in the step's flat token order
    page_tables: torch.Tensor  # [Bg, pages] page ids, padded with 0
    query_scatter: torch.Tensor  # [Tg] each token's row in the padded [Bg * max_query_len]
    # [Bg, 1, max_query_len, max_kv_len] True where a query may attend; None when every query
    # sees every key (decodes of equal context length)
    mask: torch.Tensor | None
    num_seqs: int
    max_query_len: int
    max_kv_len: int
    # A lone sequence whose pages are consecutive reads them as a slice of the pool, not a copy.
    first_page: int | None = None


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each flat token in its sequence
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V goes to
    groups: list[AttentionGroup]

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
        q_lens = torch.tensor(query_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        offset_in_seq = torch.arange(int(q_lens.sum())) - starts[seq_of_token]
        positions = torch.tensor(context_lens)[seq_of_token] + offset_in_seq
        table = _page_table(
            page_tables, max(c + q for c, q in zip(context_lens, query_lens)), page_size
        )
        slot_mapping = (
            table[seq_of_token, positions // page_size] * page_size + positions % page_size
        )
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        prefills = [i for i, n in enumerate(query_lens) if n > 1]
        groups = [
            _group(seqs, query_lens, context_lens, page_tables, table, starts, page_size, device)
            for seqs in (decodes, prefills)
            if seqs
        ]
        return cls(positions.to(device), slot_mapping.to(device), groups)


def _page_table(page_tables: list[list[int]], max_kv: int, page_size: int) -> torch.Tensor:
    pages = -(-max_kv // page_size)
    rows = [row[:pages] + [0] * (pages - len(row[:pages])) for row in page_tables]
    return torch.tensor(rows, dtype=torch.long)


def _group(
    seqs: list[int],
    query_lens: list[int],
    context_lens: list[int],
    page_tables: list[list[int]],
    table: torch.Tensor,
    starts: torch.Tensor,
    page_size: int,
    device: torch.device,
) -> AttentionGroup:
    q_lens = torch.tensor([query_lens[s] for s in seqs])
    ctx = torch.tensor([context_lens[s] for s in seqs])
    max_q, max_kv = int(q_lens.max()), int((q_lens + ctx).max())
    local_seq = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    offset = torch.arange(int(q_lens.sum())) - (torch.cumsum(q_lens, 0) - q_lens)[local_seq]
    token_index = starts[torch.tensor(seqs)][local_seq] + offset
    pages = -(-max_kv // page_size)
    uniform_decodes = max_q == 1 and len({context_lens[s] for s in seqs}) == 1
    return AttentionGroup(
        token_index=token_index.to(device),
        page_tables=table[torch.tensor(seqs), :pages].to(device),
        query_scatter=(local_seq * max_q + offset).to(device),
        mask=None if uniform_decodes else _mask(local_seq, offset, ctx, max_q, max_kv, device),
        num_seqs=len(seqs),
        max_query_len=max_q,
        max_kv_len=max_kv,
        first_page=_first_of_consecutive(page_tables[seqs[0]][:pages]) if len(seqs) == 1 else None,
    )


def _mask(
    local_seq: torch.Tensor,
    offset: torch.Tensor,
    ctx: torch.Tensor,
    max_q: int,
    max_kv: int,
    device: torch.device,
) -> torch.Tensor:
    query_pos = torch.zeros(len(ctx), max_q, dtype=torch.long)
    query_pos[local_seq, offset] = ctx[local_seq] + offset
    mask = torch.arange(max_kv).view(1, 1, -1) <= query_pos.unsqueeze(-1)
    return mask.unsqueeze(1).to(device)


def _first_of_consecutive(pages: list[int]) -> int | None:
    first = pages[0]
    return first if pages == list(range(first, first + len(pages))) else None


class PagedAttention(nn.Module):
    """Softmax attention for one layer; the model runner binds `k_cache`/`v_cache` to it."""

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
        if len(meta.groups) == 1 and meta.groups[0].token_index.numel() == q.shape[0]:
            return self._attend(q, meta.groups[0])  # one group in step order: no reindexing
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in meta.groups:
            out[group.token_index] = self._attend(q[group.token_index], group)
        return out

    def _attend(self, q: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        keys, values = self._gather(self.k_cache, group), self._gather(self.v_cache, group)
        queries = self._pad_queries(q, group)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(group.num_seqs * group.max_query_len, -1)
        return out if group.max_query_len == 1 else out[group.query_scatter]

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        self.k_cache.view(flat_shape).index_copy_(0, slots, k.to(self.k_cache.dtype))
        self.v_cache.view(flat_shape).index_copy_(0, slots, v.to(self.v_cache.dtype))

    @staticmethod
    def _gather(cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        if group.first_page is not None:
            num_pages = group.page_tables.shape[1]
            pages = cache[group.first_page : group.first_page + num_pages].unsqueeze(0)
        else:
            pages = cache[group.page_tables]  # [B, pages, page_size, kv_heads, dim]
        return pages.flatten(1, 2)[:, : group.max_kv_len].transpose(1, 2)  # [B, kv_heads, kv, dim]

    def _pad_queries(self, q: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        if group.max_query_len == 1:  # decodes: one query each, already in group order
            return q.unsqueeze(2)  # [B, heads, 1, dim]
        padded = q.new_zeros(group.num_seqs * group.max_query_len, self.num_heads, self.head_dim)
        padded[group.query_scatter] = q.to(padded.dtype)
        shape = (group.num_seqs, group.max_query_len, self.num_heads, self.head_dim)
        return padded.view(shape).transpose(1, 2)
