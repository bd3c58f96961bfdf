"""Decode steps replayed from CUDA graphs.

A decode step launches hundreds of small kernels; on a GPU their launch, not their work, sets the
pace at small batches. At start the runner captures the whole forward pass (embedding to logits)
of a decode step once per batch-size bucket, over persistent input buffers (token ids, positions,
slot mapping, page tables, the block mask's tensors). Each decode-only step then copies its
inputs into the buffers, padded up to the next bucket, and replays that graph; mixed steps and
decode batches past the largest bucket run eagerly. Padding rows decode into a scratch page of
their own (one page past those the scheduler hands out), so they never touch a request's keys.
Sampling runs after the replay, on the real rows' logits.

The bucket choice, buffer sizes and padding are plain functions (tested on the CPU); only
`CudaGraphDecoder.capture` needs CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from sluice.attention.flex import FlexBackend, FlexMetadata, logical_pages
from sluice.cache.kv_cache import KVCache
from sluice.layers.forward_context import ForwardContext
from sluice.models.base import CausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphShape:
    """What the buffers must hold: up to `max_batch` decodes of up to `max_pages` pages each,
    over a pool of `num_pages` pages whose last, `num_pages - 1`, is the padding rows' scratch."""

    max_batch: int
    max_pages: int
    num_pages: int
    page_size: int

    @property
    def scratch_page(self) -> int:
        return self.num_pages - 1


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8, up to and with `max_batch`
    (a decode batch pads to the next one: at most 7 wasted rows, and no more graphs than
    max_batch / 8 + 3)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


def bucket_for(batch: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `batch`; None past the largest (the step runs eagerly)."""
    return next((b for b in buckets if b >= batch), None)


@dataclass
class DecodeInputs:
    """One step's inputs, padded to its bucket, as the buffers hold them (CPU tensors)."""

    input_ids: torch.Tensor  # [B]
    meta: FlexMetadata  # decode metadata of B rows, tables [B, max_pages]


def padded_decode_inputs(
    token_ids: list[int],
    context_lens: list[int],
    page_tables: list[list[int]],
    bucket: int,
    shape: GraphShape,
) -> DecodeInputs:
    """The step's decodes, then `bucket - len(token_ids)` padding rows: token 0 at position 0 of
    the scratch page, which only they read and write."""
    pad = bucket - len(token_ids)
    ps = shape.page_size
    tables = [row[: c // ps + 1] for row, c in zip(page_tables, context_lens)]
    tables += [[shape.scratch_page]] * pad
    positions = torch.tensor(context_lens + [0] * pad)
    rows = torch.arange(bucket)
    page_of_token = torch.tensor([row[-1] for row in tables])
    table = torch.full((bucket, shape.max_pages), -1, dtype=torch.long)
    indices = torch.zeros(bucket, 1, 1, shape.max_pages, dtype=torch.int32)
    for i, row in enumerate(tables):
        table[i, : len(row)] = torch.tensor(row)
        indices[i, 0, 0, : len(row)] = torch.tensor(row, dtype=torch.int32)
    meta = FlexMetadata(
        positions=positions,
        slot_mapping=page_of_token * ps + positions % ps,
        query_seq=rows,
        page_tables=table,
        logical_page=logical_pages(tables, shape.num_pages),
        kv_num_blocks=torch.tensor([len(r) for r in tables], dtype=torch.int32).view(-1, 1, 1),
        kv_indices=indices,
        page_size=ps,
        decode=True,
    )
    return DecodeInputs(torch.tensor(token_ids + [0] * pad), meta)


class CudaGraphDecoder:
    """A captured graph per bucket over one set of buffers sized for the largest."""

    def __init__(
        self, model: CausalLM, kv_cache: KVCache, backend: FlexBackend, shape: GraphShape
    ) -> None:
        self.model, self.kv_cache, self.backend, self.shape = model, kv_cache, backend, shape
        self.buckets = batch_buckets(shape.max_batch)
        device = kv_cache.device
        empty = padded_decode_inputs([], [], [], shape.max_batch, shape)
        self._buffers = _to(empty, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # each bucket's view of the buffers, kept: its block mask, built by the warm-up run,
        # is the one the capture records
        self._views: dict[int, FlexMetadata] = {}

    def capture(self) -> None:
        """Capture every bucket, the largest first (its memory pool then serves the rest)."""
        start = time.perf_counter()
        pool = None
        for bucket in sorted(self.buckets, reverse=True):
            with torch.inference_mode():
                self.forward_eagerly(bucket)  # compiles FlexAttention's kernel, uncaptured
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.forward_eagerly(bucket)
            pool = graph.pool()
            self._graphs[bucket] = (graph, logits)
        logger.info(
            "CUDA graphs: %d decode buckets (1..%d) captured in %.1f s",
            len(self.buckets),
            self.shape.max_batch,
            time.perf_counter() - start,
        )

    def run(
        self, token_ids: list[int], context_lens: list[int], page_tables: list[list[int]]
    ) -> torch.Tensor | None:
        """Logits [B, vocab] of a decode-only step, or None where no bucket holds it."""
        bucket = self.load(token_ids, context_lens, page_tables)
        if bucket is None:
            return None
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[: len(token_ids)]

    def load(
        self, token_ids: list[int], context_lens: list[int], page_tables: list[list[int]]
    ) -> int | None:
        """Copy a decode step into the buffers, padded to its bucket; that bucket, or None."""
        bucket = bucket_for(len(token_ids), self.buckets)
        if bucket is None:
            return None
        step = padded_decode_inputs(token_ids, context_lens, page_tables, bucket, self.shape)
        self._buffers.input_ids[:bucket].copy_(step.input_ids, non_blocking=True)
        for name, buffer in _tensors(self._buffers.meta).items():
            value = getattr(step.meta, name)
            target = buffer if name == "logical_page" else buffer[:bucket]
            target.copy_(value, non_blocking=True)
        return bucket

    def forward_eagerly(self, bucket: int) -> torch.Tensor:
        """The forward pass a graph captures: logits [bucket, vocab] of the buffers' first
        `bucket` rows."""
        if bucket not in self._views:
            whole = self._buffers.meta
            view = {
                name: (t if name == "logical_page" else t[:bucket])
                for name, t in _tensors(whole).items()
            }
            self._views[bucket] = dataclasses.replace(whole, **view)
        ctx = ForwardContext(self._views[bucket], self.kv_cache, self.backend)
        return self.model.compute_logits(self.model(self._buffers.input_ids[:bucket], ctx))


def _tensors(meta: FlexMetadata) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(meta).items() if isinstance(v, torch.Tensor)}


def _to(inputs: DecodeInputs, device: torch.device) -> DecodeInputs:
    return DecodeInputs(inputs.input_ids.to(device), inputs.meta.to(device))
