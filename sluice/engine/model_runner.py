"""Turns a scheduled batch into flat tensors, runs the model, samples the rows that finish a step.

The runner owns the engine's caches (`KVCache`, and `StateCache` for hybrid models) and the
attention backend chosen at start; each step it hands them to the model in a `ForwardContext`
built from plain lists (`forward_context`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from sluice.attention.select import select_backend
from sluice.cache.kv_cache import KVCache
from sluice.cache.state_cache import StateCache
from sluice.config import ModelConfig
from sluice.engine.compiled_step import compiled_step
from sluice.engine.request import Request, TokenLogprob
from sluice.engine.scheduler import ScheduledBatch
from sluice.engine.state_pool import StatePool
from sluice.layers.forward_context import ForwardContext
from sluice.layers.sampler import Sampler, SamplingBatch
from sluice.layers.state import spec_bytes
from sluice.models.base import CausalLM


@dataclass
class SampledToken:
    request: Request
    token_id: int
    logprob: TokenLogprob | None


def allocate_state(
    model: CausalLM, num_slots: int, dtype: torch.dtype, device: torch.device
) -> StateCache:
    """Zeroed state of `num_slots` slots for every recurrent layer of a hybrid model."""
    specs = [layer.state_spec(dtype) for layer in model.state_layers()]
    return StateCache.allocate(specs, num_slots, device)


def state_bytes_per_slot(model: CausalLM, dtype: torch.dtype) -> int:
    return spec_bytes([layer.state_spec(dtype) for layer in model.state_layers()])


def kv_bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_attention_layers * config.num_kv_heads * config.head_dim
    return per_token * page_size * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        device: torch.device,
        dtype: torch.dtype,
        kv_dtype: torch.dtype,
        num_pages: int,
        page_size: int,
        eos_token_ids: frozenset[int] = frozenset(),
        state_pool: StatePool | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.page_size = page_size
        self.sampler = Sampler()
        self.state_pool = state_pool
        self.kv_cache = KVCache.allocate(model.config, num_pages, page_size, kv_dtype, device)
        self.state_cache = (
            allocate_state(model, state_pool.num_slots, dtype, device)
            if state_pool is not None
            else None
        )
        head_dim = model.config.head_dim
        self.compiled_step = (
            compiled_step(model, self.kv_cache, select_backend(head_dim, device, compiled=True))
            if compile
            else None
        )
        self.backend = (
            self.compiled_step.backend
            if self.compiled_step is not None
            else select_backend(head_dim, device, compiled=False)
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        input_ids, ctx = self._prepare_inputs(batch)
        to_sample = [
            (row, req)
            for row, (req, n) in enumerate(zip(batch.requests, batch.num_tokens))
            if req.num_computed_tokens + n == req.num_tokens
        ]
        last_token_rows = list(itertools.accumulate(batch.num_tokens))
        rows = [last_token_rows[row] - 1 for row, _ in to_sample]
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.compiled_step is not None:
            logits = self.compiled_step(input_ids, ctx, rows)
        else:
            if self.state_cache is not None:
                self.state_cache.apply(self.state_pool.take_ops())
            logits = self.model.compute_logits(self.model(input_ids, ctx)[rows])
        return self._sample(logits, [req for _, req in to_sample]) if to_sample else []

    def forward_context(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        state_slots: list[int] | None = None,
    ) -> ForwardContext:
        """The step's context over this runner's caches: `query_lens[i]` tokens of request i
        after its `context_lens[i]` cached ones, on pages `page_tables[i]`, in state slot
        `state_slots[i]` (hybrid models)."""
        return ForwardContext.build(
            self.backend,
            self.kv_cache,
            query_lens,
            context_lens,
            page_tables,
            self.device,
            self.state_cache,
            state_slots,
        )

    def _prepare_inputs(self, batch: ScheduledBatch) -> tuple[torch.Tensor, ForwardContext]:
        token_ids: list[int] = []
        for req, n in zip(batch.requests, batch.num_tokens):
            token_ids.extend(req.token_ids(req.num_computed_tokens, req.num_computed_tokens + n))
        ctx = self.forward_context(
            batch.num_tokens,
            [req.num_computed_tokens for req in batch.requests],
            [req.page_ids for req in batch.requests],
            [req.state_slot for req in batch.requests] if self.state_cache is not None else None,
        )
        return torch.tensor(token_ids, dtype=torch.long, device=self.device), ctx

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        self._suppress_early_stops(logits, requests)
        sampling = SamplingBatch.build(
            params=[r.params for r in requests],
            generators=[r.generator for r in requests],
            prompt_ids=[r.prompt_token_ids for r in requests],
            output_ids=[r.output_token_ids for r in requests],
            device=self.device,
        )
        out = self.sampler(logits, sampling)
        token_ids = out.token_ids.tolist()
        logprobs = (
            _token_logprobs(out, requests) if out.logprobs is not None else [None] * len(requests)
        )
        return [SampledToken(r, t, lp) for r, t, lp in zip(requests, token_ids, logprobs)]

    def _suppress_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """`min_tokens`: a request may not stop (EOS or a stop token id) before it has that many."""
        for row, req in enumerate(requests):
            if len(req.output_token_ids) < req.params.min_tokens:
                stops = list(self.eos_token_ids | set(req.params.stop_token_ids))
                logits[row, stops] = float("-inf")


def _token_logprobs(out, requests: list[Request]) -> list[TokenLogprob | None]:
    chosen = out.logprobs.tolist()
    top_ids, top_values = out.top_logprob_ids.tolist(), out.top_logprobs.tolist()
    result: list[TokenLogprob | None] = []
    for i, req in enumerate(requests):
        k = req.params.logprobs
        if k is None:
            result.append(None)
            continue
        token_id = int(out.token_ids[i])
        result.append(
            TokenLogprob(token_id, chosen[i], list(zip(top_ids[i][:k], top_values[i][:k])))
        )
    return result
