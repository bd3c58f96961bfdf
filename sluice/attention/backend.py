"""The interface between attention layers and the code that computes attention.

A layer projects q, k and v and calls `ctx.backend.forward(layer, ...)`; the backend writes the
step's keys and values into that layer's pages and attends. The engine picks one backend at
start (`attention/select.py`): how attention runs (a CPU kernel, inductor's tensor ops, SDPA over
gathered pages, a CUDA kernel) is decided there, never in the layers. Each backend builds its
own per-step metadata, once per step, from plain lists.

A compiled step is a graph captured once and replayed for steps of every size; two hooks serve
that capture: `metadata_for_capture` (a step to capture with, writing only to page 0, which a
real step always writes before reading) and `mark_dynamic` (which sizes of the metadata vary
from step to step, so the capture does not specialize on them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from sluice.attention.metadata import AttentionMetadata, DecodeMetadata

if TYPE_CHECKING:
    from sluice.layers.forward_context import ForwardContext

StepMetadata = AttentionMetadata | DecodeMetadata


class AttentionBackend(ABC):
    @abstractmethod
    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> StepMetadata:
        """`query_lens[i]` new tokens of request i after its `context_lens[i]` cached ones, on
        pages `page_tables[i]`."""

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """Write k, v [T, kv_heads, dim] to attention layer `layer`'s pages in `ctx.kv_cache`
        and attend with q [T, heads, dim] -> [T, heads * dim]."""

    def metadata_for_capture(
        self, query_lens: list[int], context_lens: list[int], page_size: int, device: torch.device
    ) -> StepMetadata:
        """A step of these sizes whose every token is written to (and read from) page 0."""
        tables = [[0] * (-(-(c + q) // page_size)) for c, q in zip(context_lens, query_lens)]
        return self.build_metadata(query_lens, context_lens, tables, page_size, device)

    def mark_dynamic(self, meta: StepMetadata) -> None:
        """Mark the sizes of `meta`'s tensors that vary between steps of one captured graph."""
        for per_token in (meta.positions, meta.slot_mapping):
            torch._dynamo.decorators.mark_unbacked(per_token, 0)
