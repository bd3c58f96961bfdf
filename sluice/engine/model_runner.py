"""The in-process executor: turns a step's plain data into flat tensors, runs the model, samples
the rows that sample.

The runner owns the engine's caches (`KVCache`, and `StateCache` for hybrid models) and the
attention backend chosen at start; each step it hands them to the model in a `ForwardContext`
built from plain lists (`forward_context`)."""

from __future__ import annotations

import torch

from sluice.attention.select import select_backend
from sluice.cache.kv_cache import KVCache
from sluice.cache.state_cache import StateCache
from sluice.config import ModelConfig
from sluice.engine.compiled_step import compiled_step
from sluice.engine.request import TokenLogprob
from sluice.engine.state_pool import StatePool
from sluice.engine.step import SampledToken, SamplingRow, ScheduledRequest, StepInput, StepOutput
from sluice.layers.forward_context import ForwardContext
from sluice.layers.sampler import Sampler, SamplingBatch
from sluice.layers.state import spec_bytes
from sluice.models.base import CausalLM
from sluice.sampling_params import SamplingParams
from sluice.sparse.decoding import SparseDecoding


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
        sparse: SparseDecoding | None = None,
    ) -> None:
        self.model = model
        self.sparse = sparse
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.page_size = page_size
        self.sampler = Sampler()
        self.state_pool = state_pool
        self._generators: dict[str, torch.Generator] = {}  # seeded requests' own, by id
        self.kv_cache = KVCache.allocate(model.config, num_pages, page_size, kv_dtype, device)
        self.state_cache = (
            allocate_state(model, state_pool.num_slots, dtype, device)
            if state_pool is not None
            else None
        )
        head_dim = model.config.head_dim
        self.compiled_step = (
            compiled_step(
                model, self.kv_cache, select_backend(head_dim, device, compiled=True), sparse
            )
            if compile
            else None
        )
        self.backend = (
            self.compiled_step.backend
            if self.compiled_step is not None
            else select_backend(head_dim, device, compiled=False)
        )

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        for request_id in step.finished_ids:
            self._generators.pop(request_id, None)
        input_ids, ctx = self._prepare_inputs(step)
        sampling = [r for r in step.requests if r.sampling is not None]
        rows = torch.tensor(_sample_rows(step), dtype=torch.long, device=self.device)
        if self.compiled_step is not None:
            logits = self.compiled_step(input_ids, ctx, rows)
        else:
            if self.state_cache is not None:
                self.state_cache.apply(step.state_ops)
            logits = self.model.compute_logits(self.model(input_ids, ctx)[rows])
        return self._sample(logits, sampling) if sampling else StepOutput()

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
            self.sparse,
        )

    def _prepare_inputs(self, step: StepInput) -> tuple[torch.Tensor, ForwardContext]:
        token_ids = [t for r in step.requests for t in r.token_ids]
        ctx = self.forward_context(
            [r.num_tokens for r in step.requests],
            [r.context_len for r in step.requests],
            [r.page_ids for r in step.requests],
            [r.state_slot for r in step.requests] if self.state_cache is not None else None,
        )
        return torch.tensor(token_ids, dtype=torch.long, device=self.device), ctx

    def _sample(self, logits: torch.Tensor, requests: list[ScheduledRequest]) -> StepOutput:
        """Each sample row draws with its request's settings; a request's rows come in order
        (the continuation of its last token, then of each draft) with the history up to them."""
        rows = [(r, r.sampling, _history(r, i)) for r in requests for i in range(r.num_sample_rows)]
        self._suppress_early_stops(logits, [(s, out) for _, s, out in rows])
        sampling = SamplingBatch.build(
            params=[s.params for _, s, _ in rows],
            generators=[self._generator(r.request_id, s.params) for r, s, _ in rows],
            prompt_ids=[s.prompt_token_ids for _, s, _ in rows],
            output_ids=[out for _, _, out in rows],
            device=self.device,
        )
        out = self.sampler(logits, sampling)
        token_ids = out.token_ids.tolist()
        logprobs = _token_logprobs(out, [s.params for _, s, _ in rows])
        sampled: dict[str, list[SampledToken]] = {}
        for (request, _, _), token_id, logprob in zip(rows, token_ids, logprobs):
            sampled.setdefault(request.request_id, []).append(SampledToken(token_id, logprob))
        return StepOutput(sampled)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        """A seeded request draws only from its own generator, kept here across its steps."""
        if params.seed is None:
            return None
        if request_id not in self._generators:
            self._generators[request_id] = torch.Generator(self.device).manual_seed(params.seed)
        return self._generators[request_id]

    def _suppress_early_stops(
        self, logits: torch.Tensor, rows: list[tuple[SamplingRow, list[int]]]
    ) -> None:
        """`min_tokens`: a request may not stop (EOS or a stop token id) before it has that many."""
        for row, (sampling, output_ids) in enumerate(rows):
            if len(output_ids) < sampling.params.min_tokens:
                stops = list(self.eos_token_ids | set(sampling.params.stop_token_ids))
                logits[row, stops] = float("-inf")


def _sample_rows(step: StepInput) -> list[int]:
    """Flat token rows whose logits sample: the last `num_sample_rows` of each request's."""
    rows, end = [], 0
    for r in step.requests:
        end += r.num_tokens
        rows.extend(range(end - r.num_sample_rows, end))
    return rows


def _history(request: ScheduledRequest, row: int) -> list[int]:
    """The output tokens before sample row `row`: the request's own, then the drafts before it."""
    output = request.sampling.output_token_ids
    if row == 0:
        return output
    drafts = request.token_ids[request.num_tokens - request.num_speculative :]
    return output + drafts[:row]


def _token_logprobs(out, params: list[SamplingParams]) -> list[TokenLogprob | None]:
    if out.logprobs is None:
        return [None] * len(params)
    chosen = out.logprobs.tolist()
    top_ids, top_values = out.top_logprob_ids.tolist(), out.top_logprobs.tolist()
    result: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        k = p.logprobs
        if k is None:
            result.append(None)
            continue
        token_id = int(out.token_ids[i])
        result.append(
            TokenLogprob(token_id, chosen[i], list(zip(top_ids[i][:k], top_values[i][:k])))
        )
    return result
