"""Attention as one opaque operator in a compiled graph, for steps whose shapes change every step.

The compiled step's graph for steps that are not decodes alone (prefill chunks, alone or beside
decodes) must not trace attention: variable-length prompts, their groups and masks would
specialize it. There the forward context carries `OpaqueBackend`, whose forward is a single
operator, `sluice::paged_attention(q, k, v, layer, scale)`: inductor fuses everything around it,
and at run time the operator calls the engine's real backend eagerly.

An operator takes only tensors and numbers, so the step's forward context reaches it another
way: the compiled step installs it around the graph's call (`installed`), and the operator reads
it here. This module is the only place a context is held outside the forward's arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from sluice.attention.backend import AttentionBackend, StepMetadata

if TYPE_CHECKING:
    from sluice.layers.forward_context import ForwardContext

_installed: ForwardContext | None = None


@contextmanager
def installed(ctx: ForwardContext) -> Iterator[None]:
    """Make `ctx` (with the backend that really computes attention) the operator's context for
    the duration of a compiled forward."""
    global _installed
    _installed = ctx
    try:
        yield
    finally:
        _installed = None


class OpaqueBackend(AttentionBackend):
    """What a traced forward sees in place of `inner`: one operator call per layer."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner

    def build_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> StepMetadata:
        return self.inner.build_metadata(query_lens, context_lens, page_tables, page_size, device)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        return torch.ops.sluice.paged_attention(q, k, v, layer, scale)


def _paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    if _installed is None:
        raise RuntimeError("sluice::paged_attention called outside attention.opaque.installed()")
    return _installed.backend.forward(layer, q, k, v, scale, _installed)


def _paged_attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# Defined through the dispatcher directly: torch.library.custom_op adds tens of microseconds of
# Python per call, and a step makes one call per layer.
_library = torch.library.Library("sluice", "DEF")
_library.define("paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor")
_library.impl("paged_attention", _paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("sluice::paged_attention", _paged_attention_shape, lib=_library)
