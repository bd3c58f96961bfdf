"""Attention by FlexAttention over the pages in place: the CUDA backend.

The keys and values are the layer's whole pool, viewed as one sequence of slots; what each query
may see is a block mask whose key blocks are pages, built from the page tables. No key is
gathered or copied and no query is padded:

- decodes alone (the CUDA graphs' steps) run one query per batch row, each row's key blocks its
  own pages (`kv_indices[b]`), which FlexAttention serves with its decoding kernel;
- every other step packs its tokens into one row (varlen): a block of `Q_BLOCK` queries lists the
  pages of every sequence among its tokens, and the mask keeps each query to its own sequence's
  pages up to its own position.

The mask reads, per step: each query's sequence and position, each sequence's page table, and the
logical index of every page in use (page -> its place in the sequences that hold it; a page shared
through the prefix cache holds the same prompt positions in each). The block mask only says which
pages a block may touch; the mask decides per key, so a block mask that lists too much costs time,
never correctness. On the CPU FlexAttention runs its unfused reference (tests prove the logic
here); on CUDA the compiled Triton kernel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sluice.attention.backend import AttentionBackend
from sluice.attention.metadata import _page_table

if TYPE_CHECKING:
    from sluice.layers.forward_context import ForwardContext

# Queries per block of the packed (varlen) form: the Triton kernel's query tile.
Q_BLOCK = 128


@dataclass
class FlexMetadata:
    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat cache slot its K/V goes to
    query_seq: torch.Tensor  # [T] the sequence of each query
    page_tables: torch.Tensor  # [S, P] page ids, padded with -1
    logical_page: torch.Tensor  # [pages] each page's index in its sequences' tables, -1 unused
    kv_num_blocks: torch.Tensor  # [B, 1, Qblocks] pages each query block may read
    kv_indices: torch.Tensor  # [B, 1, Qblocks, P'] which pages, padded with 0
    page_size: int
    decode: bool  # one query per batch row (B = T), else one packed row (B = 1)
    # built by the step's first layer, read by the rest (and kept by a captured CUDA graph)
    mask: BlockMask | None = None

    def to(self, device: torch.device) -> FlexMetadata:
        moved = {
            name: value.to(device, non_blocking=True)
            for name, value in vars(self).items()
            if isinstance(value, torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def allowed(meta: FlexMetadata, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """May query `query` (flat token index) see pool slot `kv`? Its sequence holds the slot's
    page, at a place up to the query's own position."""
    num_pages = meta.logical_page.shape[0]
    page = kv // meta.page_size
    logical = meta.logical_page[page.clamp(max=num_pages - 1)]
    seq = meta.query_seq[query]
    table = meta.page_tables[seq, logical.clamp(0, meta.page_tables.shape[1] - 1)]
    own = (page < num_pages) & (logical >= 0) & (table == page)
    return own & (logical * meta.page_size + kv % meta.page_size <= meta.positions[query])


def block_mask(meta: FlexMetadata, pool_slots: int) -> BlockMask:
    """Decodes are the batch rows (one query each), a packed step's tokens the query rows."""

    def mask_mod(b, h, q, kv):
        return allowed(meta, b if meta.decode else q, kv)

    q_len = 1 if meta.decode else meta.positions.shape[0]
    return BlockMask.from_kv_blocks(
        meta.kv_num_blocks,
        meta.kv_indices,
        BLOCK_SIZE=(Q_BLOCK, meta.page_size),
        mask_mod=mask_mod,
        seq_lengths=(q_len, pool_slots),
        compute_q_blocks=False,  # for the backward pass only
    )


class FlexBackend(AttentionBackend):
    def __init__(self, compiled: bool) -> None:
        """`compiled`: FlexAttention's fused kernel (CUDA); else its unfused reference."""
        self._attend = torch.compile(flex_attention, dynamic=True) if compiled else flex_attention
        self.compiled = compiled

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> FlexMetadata:
        return build(query_lens, context_lens, page_tables, page_size).to(device)

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
        k_slots, v_slots = cache.slots(layer)
        k_slots.index_copy_(0, meta.slot_mapping, k.to(k_slots.dtype))
        v_slots.index_copy_(0, meta.slot_mapping, v.to(v_slots.dtype))
        if meta.mask is None:
            meta.mask = block_mask(meta, k_slots.shape[0])
        keys, values = (s.transpose(0, 1).unsqueeze(0) for s in (k_slots, v_slots))
        # [T, heads, dim] -> [B, heads, Tb, dim]: a row per decode, else one packed row
        queries = q.unsqueeze(2) if meta.decode else q.transpose(0, 1).unsqueeze(0)
        out = self._attend(
            queries.to(keys.dtype),
            keys,
            values,
            block_mask=meta.mask,
            scale=scale,
            enable_gqa=True,
            # The kernel's key tile must not span pages: one page a tile keeps each query's
            # reduction order independent of where its pages lie (pytorch/pytorch#182593).
            kernel_options={"BLOCK_N": meta.page_size} if self.compiled else None,
        )
        out = out.squeeze(2) if meta.decode else out.squeeze(0).transpose(0, 1)
        return out.reshape(q.shape[0], -1).to(q.dtype)


def build(
    query_lens: list[int], context_lens: list[int], page_tables: list[list[int]], page_size: int
) -> FlexMetadata:
    """A step's metadata on the CPU: decodes alone get one batch row each, else one packed row."""
    q_lens = torch.tensor(query_lens)
    query_seq = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    positions = torch.tensor(context_lens)[query_seq] + torch.arange(len(query_seq))
    positions -= starts[query_seq]
    kv_lens = [c + n for c, n in zip(context_lens, query_lens)]
    used = [row[: -(-n // page_size)] for row, n in zip(page_tables, kv_lens)]
    table = _page_table(used, max(kv_lens), page_size)
    slots = table[query_seq, positions // page_size] * page_size + positions % page_size
    padded = torch.tensor([row + [-1] * (table.shape[1] - len(row)) for row in used])
    decode = all(n == 1 for n in query_lens)
    blocks = [[row] for row in used] if decode else [_pages_per_query_block(used, query_seq)]
    num_blocks, indices = _kv_blocks(blocks)
    return FlexMetadata(
        positions,
        slots,
        query_seq,
        padded,
        logical_pages(used),
        num_blocks,
        indices,
        page_size,
        decode,
    )


def logical_pages(page_tables: list[list[int]], num_pages: int | None = None) -> torch.Tensor:
    """[num_pages] each page's index in the tables that hold it, -1 for pages none holds."""
    pages = torch.tensor([p for row in page_tables for p in row], dtype=torch.long)
    places = torch.cat([torch.arange(len(row)) for row in page_tables])
    size = num_pages or 1 + int(pages.max())
    logical = torch.full((size,), -1, dtype=torch.long).scatter_(0, pages, places)
    if not torch.equal(logical[pages], places):  # the mask would misplace a page's keys
        raise ValueError("a page sits at different places in the page tables of one step")
    return logical


def _pages_per_query_block(used: list[list[int]], query_seq: torch.Tensor) -> list[list[int]]:
    """Each block of `Q_BLOCK` packed queries: the pages of every sequence among its tokens."""
    blocks = []
    for start in range(0, len(query_seq), Q_BLOCK):
        seqs = query_seq[start : start + Q_BLOCK].unique().tolist()
        blocks.append(sorted({p for s in seqs for p in used[s]}))
    return blocks


def _kv_blocks(rows: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B][Qblocks][pages] -> kv_num_blocks [B, 1, Qblocks], kv_indices [B, 1, Qblocks, max]."""
    width = max(len(pages) for blocks in rows for pages in blocks)
    indices = [[pages + [0] * (width - len(pages)) for pages in blocks] for blocks in rows]
    counts = [[len(pages) for pages in blocks] for blocks in rows]
    as_int = torch.int32
    return (
        torch.tensor(counts, dtype=as_int).unsqueeze(1),
        torch.tensor(indices, dtype=as_int).unsqueeze(1),
    )
