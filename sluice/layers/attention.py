"""Grouped-query attention over a paged KV cache.

Each layer writes this step's K/V into its pages (through `slot_mapping`), then every request's
queries attend to that request's whole context, gathered through its page table. Requests are
grouped by query length: decodes (one query each) share one SDPA call, prefill chunks share
another with queries padded to the longest chunk, so a long chunk never pads the decodes.
Masks and indices are built once per step and shared by all layers.

Compiled steps (engine/compiled_step.py) read pages in place through a paged kernel instead,
one query per row: decodes, and the tokens of prompt chunks up to `KERNEL_MAX_CONTEXT` (each
with the context up to itself). Steps of decodes alone trace it in; in every other step
attention is one opaque operator, `sluice::paged_attention`: inductor fuses everything around
it, while the cache write and the kernel (or SDPA for long prompts), whose shapes change every
step, run eagerly inside it. The operator takes only tensors and the layer's key, so one graph
serves every batch and context length; the step's metadata is published once per step by
`step_metadata` (as vLLM's forward context does).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sluice.kernels import attention_cpu

# Compiled steps read every token's keys through the paged kernel, one query at a time, except
# the chunks of prompts past this many tokens: there SDPA, which shares each key among a chunk's
# queries, is the faster (a 512-token chunk ending at 2048 tokens: SDPA took 0.7-0.8x the
# kernel's time; from an empty context, 1.2x).
KERNEL_MAX_CONTEXT = 1024


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
    # A lone sequence whose pages are consecutive reads its keys as one slice of the pool's
    # slots, [start, stop), not a gathered copy.
    slot_range: tuple[int, int] | None = None
    # [Bg] context length of each decode, where the group runs the compiled paged kernel.
    kv_lens: torch.Tensor | None = None


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
        paged_kernel: bool = False,
    ) -> AttentionMetadata:
        """`context_lens[i]`: tokens of request i already cached before this step.
        `paged_kernel` (compiled steps): tokens read their pages through the paged kernel, but
        for prompts past `KERNEL_MAX_CONTEXT`; otherwise decodes share one SDPA call and prompt
        chunks another."""
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
        prompts = [i for i, n in enumerate(query_lens) if n > 1]
        if paged_kernel:  # SDPA only for the prompts past the kernel's reach
            prompts = [i for i in prompts if context_lens[i] + query_lens[i] > KERNEL_MAX_CONTEXT]
        group_args = (query_lens, context_lens, page_tables, table, starts, page_size, device)
        groups = [
            _group(seqs, *group_args) for seqs in ([] if paged_kernel else decodes, prompts) if seqs
        ]
        if paged_kernel:
            # Every other token is a row of the kernel, with its sequence's pages and, as
            # context, the tokens up to itself (causal), whether it decodes or is a prompt's.
            rows = torch.isin(seq_of_token, torch.tensor(prompts, dtype=torch.long), invert=True)
            rows = rows.nonzero()[:, 0]
            if len(rows):
                kv_lens = positions[rows] + 1
                kernel_rows = _paged_rows(
                    rows, table[seq_of_token[rows]], kv_lens, page_size, device
                )
                groups.insert(0, kernel_rows)
        return cls(positions.to(device), slot_mapping.to(device), groups)


@dataclass
class DecodeMetadata:
    """A step of one new token per sequence, as tensors only: the compiled decode graph takes it
    as an input, so the cache writes and the paged kernel are traced into that graph with no
    Python between layers. Page tables have at least two columns (padding pages are masked out
    by `kv_lens`), so one compilation fits every step."""

    positions: torch.Tensor  # [B] position of each sequence's new token
    slot_mapping: torch.Tensor  # [B] flat cache slot its K/V goes to
    page_tables: torch.Tensor  # [B, P] page ids, padded with 0
    kv_lens: torch.Tensor  # [B] context length including the new token

    @classmethod
    def build(
        cls,
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> DecodeMetadata:
        """`context_lens[i]`: tokens of sequence i already cached before this step."""
        positions = torch.tensor(context_lens)
        table = _page_table(page_tables, max(2 * page_size, max(context_lens) + 1), page_size)
        rows = torch.arange(len(context_lens))
        slots = table[rows, positions // page_size] * page_size + positions % page_size
        return cls(
            positions.to(device), slots.to(device), table.to(device), (positions + 1).to(device)
        )


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
        slot_range=_consecutive_slots(page_tables[seqs[0]][:pages], max_kv, page_size)
        if len(seqs) == 1
        else None,
    )


def _paged_rows(
    token_index: torch.Tensor,
    tables: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    device: torch.device,
) -> AttentionGroup:
    """Rows of the paged kernel: one query each, with its page table and context length, and at
    least two page columns (padding pages are masked out) so one compiled kernel fits every
    step. One kernel for every row keeps a token's attention independent of the batch around it
    and of how its prompt was chunked."""
    pages = max(2, -(-int(kv_lens.max()) // page_size))
    tables = torch.nn.functional.pad(tables, (0, pages - tables.shape[1])).to(device)
    lens = kv_lens.to(device)
    _mark_paged_decode_sizes(tables, lens)
    return AttentionGroup(
        token_index=token_index.to(device),
        page_tables=tables,
        query_scatter=torch.arange(len(token_index), device=device),
        mask=None,
        num_seqs=len(token_index),
        max_query_len=1,
        max_kv_len=int(kv_lens.max()),
        kv_lens=lens,
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


def _consecutive_slots(pages: list[int], kv_len: int, page_size: int) -> tuple[int, int] | None:
    first = pages[0]
    if pages != list(range(first, first + len(pages))):
        return None
    return first * page_size, first * page_size + kv_len


class PagedAttention(nn.Module):
    """Softmax attention for one layer; the model runner binds `k_cache`/`v_cache` to it. The
    pools may hold a narrower dtype than the queries (a 16-bit cache for an fp32 model): keys and
    values are widened as they are read, and attention computes in the queries' dtype."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # [num_pages, page_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None
        # The same pools as [num_pages * page_size, kv_heads, dim]: one flat slot per token.
        self._k_slots: torch.Tensor | None = None
        self._v_slots: torch.Tensor | None = None
        # Decodes over pools on a CPU with AVX-512 take sluice's kernel (kernels/attention_cpu.cpp)
        # where it has the head size.
        self._native_decode = False
        self.key = next(_layer_keys)
        _layers[self.key] = self

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata | DecodeMetadata,
    ) -> torch.Tensor:
        """q: [T, heads, dim]; k, v: [T, kv_heads, dim]; returns [T, heads * dim]."""
        if isinstance(meta, DecodeMetadata):
            return self._attend_decodes(q, k, v, meta)
        if torch.compiler.is_compiling():
            return torch.ops.sluice.paged_attention(q, k, v, self.key)
        return self.attend(q, k, v, meta)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self._k_slots = k_cache.flatten(0, 1)
        self._v_slots = v_cache.flatten(0, 1)
        self._native_decode = (
            k_cache.device.type == "cpu"
            and self.head_dim in attention_cpu.HEAD_DIMS
            and attention_cpu.available()
        )
        for cache in (k_cache, v_cache):  # the paged kernel serves pools of every size
            torch._dynamo.mark_dynamic(cache, 0)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        self._write_cache(k, v, meta.slot_mapping)
        if len(meta.groups) == 1:  # all decodes or all prefills: every token, in step order
            return self._attend(q, meta.groups[0])
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in meta.groups:
            out[group.token_index] = self._attend(q[group.token_index], group)
        return out

    def _attend_decodes(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DecodeMetadata
    ) -> torch.Tensor:
        """Plain tensor ops on the pools themselves (not the flat views: a graph must see one
        tensor per pool to update it in place)."""
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):
            cache.view(-1, *cache.shape[2:])[meta.slot_mapping] = new.to(cache.dtype)
        kernel = attention_cpu.paged_decode if self._native_decode else paged_decode_attention
        out = kernel(q, self.k_cache, self.v_cache, meta.page_tables, meta.kv_lens, self.scale)
        return out.to(q.dtype)

    def _attend(self, q: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        if group.kv_lens is not None:
            torch._dynamo.decorators.mark_unbacked(q, 0)
            kernel = attention_cpu.paged_decode if self._native_decode else paged_decode_kernel
            out = kernel(
                q, self.k_cache, self.v_cache, group.page_tables, group.kv_lens, self.scale
            )
            return out.to(q.dtype)
        if group.slot_range is not None and group.max_query_len == 1:
            return self._attend_slice(q, *group.slot_range)
        keys = self._gather(self.k_cache, self._k_slots, group).to(q.dtype)
        values = self._gather(self.v_cache, self._v_slots, group).to(q.dtype)
        queries = self._pad_queries(q, group)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(group.num_seqs * group.max_query_len, -1)
        return out if group.max_query_len == 1 else out[group.query_scatter]

    def _attend_slice(self, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """One decoding sequence whose keys are the pool's slots [start, stop): no copies, and
        the fewest calls (this runs once per layer per token of a single stream)."""
        out = F.scaled_dot_product_attention(
            q.reshape(self.num_heads, 1, self.head_dim),
            self._k_slots[start:stop].transpose(0, 1).to(q.dtype),
            self._v_slots[start:stop].transpose(0, 1).to(q.dtype),
            scale=self.scale,
            enable_gqa=True,
        )
        return out.view(1, -1)

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        if k.dtype != self.k_cache.dtype:
            k, v = k.to(self.k_cache.dtype), v.to(self.v_cache.dtype)
        self._k_slots.index_copy_(0, slots, k)
        self._v_slots.index_copy_(0, slots, v)

    @staticmethod
    def _gather(cache: torch.Tensor, slots: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """[B, kv_heads, kv, dim] keys or values of the group's sequences."""
        if group.slot_range is not None:
            return slots[slice(*group.slot_range)].transpose(0, 1).unsqueeze(0)
        pages = cache[group.page_tables]  # [B, pages, page_size, kv_heads, dim]
        return pages.flatten(1, 2)[:, : group.max_kv_len].transpose(1, 2)  # [B, kv_heads, kv, dim]

    def _pad_queries(self, q: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        if group.max_query_len == 1:  # decodes: one query each, already in group order
            return q.unsqueeze(2)  # [B, heads, 1, dim]
        padded = q.new_zeros(group.num_seqs * group.max_query_len, self.num_heads, self.head_dim)
        padded[group.query_scatter] = q.to(padded.dtype)
        shape = (group.num_seqs, group.max_query_len, self.num_heads, self.head_dim)
        return padded.view(shape).transpose(1, 2)


# --- decode attention read in place from the pages ------------------------------------------
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
    into a padded batch first (3-4x faster than gather + SDPA at 32 sequences of 200 tokens).
    Query heads are grouped over KV heads as SDPA's enable_gqa groups them.
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


# Dynamic in batch (unbacked: a lone sequence runs the very kernel a batch runs, so its numbers
# do not depend on the batch), pages per sequence (at least 2, so never specialized to 1) and
# pool size: one compilation serves every step. Tensors are marked where they are made.
paged_decode_kernel = torch.compile(paged_decode_attention, fullgraph=True)


def _mark_paged_decode_sizes(page_tables: torch.Tensor, kv_lens: torch.Tensor) -> None:
    torch._dynamo.decorators.mark_unbacked(page_tables, 0)
    torch._dynamo.decorators.mark_unbacked(kv_lens, 0)
    torch._dynamo.mark_dynamic(page_tables, 1)


# --- the operator compiled steps call -------------------------------------------------------
_layer_keys = itertools.count()
_layers: weakref.WeakValueDictionary[int, PagedAttention] = weakref.WeakValueDictionary()
_step: AttentionMetadata | None = None


@contextmanager
def step_metadata(meta: AttentionMetadata) -> Iterator[None]:
    """Publish this step's metadata to the attention operator for the duration of a forward."""
    global _step
    _step = meta
    try:
        yield
    finally:
        _step = None


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int) -> torch.Tensor:
    if _step is None:
        raise RuntimeError("sluice::paged_attention called outside step_metadata()")
    return _layers[key].attend(q, k, v, _step)


def _paged_attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# Defined through the dispatcher directly: torch.library.custom_op adds tens of microseconds of
# Python per call, and a decode step makes one call per layer.
_library = torch.library.Library("sluice", "DEF")
_library.define("paged_attention(Tensor q, Tensor k, Tensor v, int key) -> Tensor")
_library.impl("paged_attention", _paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("sluice::paged_attention", _paged_attention_shape, lib=_library)
