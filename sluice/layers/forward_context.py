"""What one forward pass hands every layer: the step's metadata, the caches it reads and writes,
and the attention backend. Built once per step (`ForwardContext.build`, from plain lists) and
passed down as the model's forward argument; layers find their pages and state by their index
in the caches, so no cache tensor or step state lives on a module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sluice.attention.backend import AttentionBackend, StepMetadata
from sluice.cache.kv_cache import KVCache
from sluice.cache.state_cache import StateCache
from sluice.layers.state import StateMetadata

if TYPE_CHECKING:
    from sluice.sparse.decoding import SparseDecoding


@dataclass
class ForwardContext:
    attn: StepMetadata  # built by `backend`
    kv_cache: KVCache
    backend: AttentionBackend
    state: StateMetadata | None = None  # hybrid models: each request's state slot
    state_cache: StateCache | None = None
    decodes_only: bool = False  # every request computes one token: MLPs may run sparse
    sparse: SparseDecoding | None = None  # the engine's activation-sparse MLPs (sparse/)

    @classmethod
    def build(
        cls,
        backend: AttentionBackend,
        kv_cache: KVCache,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        device: torch.device,
        state_cache: StateCache | None = None,
        state_slots: list[int] | None = None,
        sparse: SparseDecoding | None = None,
        verify_slots: list[list[int]] | None = None,
    ) -> ForwardContext:
        """`query_lens[i]` tokens of request i run this step after its `context_lens[i]` cached
        ones, over pages `page_tables[i]` and (hybrid models) state slot `state_slots[i]`;
        a hybrid's verify run keeps the state after each of its tokens but the last in
        `verify_slots[i]` (see `StateMetadata`)."""
        attn = backend.build_metadata(
            query_lens, context_lens, page_tables, kv_cache.page_size, device
        )
        state = None
        if state_cache is not None:
            state = StateMetadata.build(query_lens, state_slots, device, verify_slots)
        decodes_only = all(n == 1 for n in query_lens)
        return cls(attn, kv_cache, backend, state, state_cache, decodes_only, sparse)
