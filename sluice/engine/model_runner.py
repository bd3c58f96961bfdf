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
from sluice.engine.cuda_graphs import CudaGraphDecoder, GraphShape
from sluice.engine.request import TokenLogprob
from sluice.engine.state_pool import StatePool
from sluice.engine.step import SampledToken, SamplingRow, ScheduledRequest, StepInput, StepOutput
from sluice.layers.forward_context import ForwardContext
from sluice.layers.sampler import Sampler, SamplingBatch
from sluice.layers.state import spec_bytes
from sluice.models.base import CausalLM
from sluice.sampling_params import SamplingParams
from sluice.sparse.decoding import SparseDecoding
from sluice.structured.grammar import GrammarCompiler, GrammarState, allocate_bitmask


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
        graph_shape: GraphShape | None = None,
        grammars: GrammarCompiler | None = None,
        sparse: SparseDecoding | None = None,
    ) -> None:
        """`graph_shape` (CUDA): capture decode graphs of these sizes; its scratch page is one
        past `num_pages`. `grammars` compiles the constraints of requests with
        `params.structured`. `sparse`: decode steps run activation-sparse MLPs."""
        self.model = model
        self.sparse = sparse
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = device
        self.page_size = page_size
        self.sampler = Sampler()
        self.state_pool = state_pool
        self.grammars = grammars
        self._grammar_states: dict[str, GrammarState] = {}  # constrained requests' own, by id
        pool_pages = graph_shape.num_pages if graph_shape is not None else num_pages
        self.kv_cache = KVCache.allocate(model.config, pool_pages, page_size, kv_dtype, device)
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
            if compile and device.type == "cpu"  # inductor's CPU graphs; CUDA replays its own
            else None
        )
        self.backend = (
            self.compiled_step.backend
            if self.compiled_step is not None
            else select_backend(head_dim, device, compiled=False)
        )
        self.cuda_graphs = None
        if graph_shape is not None:
            self.cuda_graphs = CudaGraphDecoder(model, self.kv_cache, self.backend, graph_shape)
            self.cuda_graphs.capture()

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        for request_id in step.finished_ids:
            self._grammar_states.pop(request_id, None)
        logits = self._replay(step)
        if logits is not None:
            return StepOutput(self._sample(logits, step.requests))
        input_ids, ctx = self._prepare_inputs(step)
        sampling = [r for r in step.requests if r.sampling is not None]
        sample_rows = _sample_rows(step)
        # Prompt logprobs come from the same forward, so a step's rows are bounded by its budget.
        all_rows = sample_rows + _prompt_rows(step)
        rows = torch.tensor(all_rows, dtype=torch.long, device=self.device)
        if self.compiled_step is not None:
            logits = self.compiled_step(input_ids, ctx, rows)
        else:
            if self.state_cache is not None:
                self.state_cache.apply(step.state_ops)
            logits = self.model.compute_logits(self.model(input_ids, ctx)[rows])
        num_sampled = len(sample_rows)
        return StepOutput(
            self._sample(logits[:num_sampled], sampling) if sampling else {},
            _prompt_logprobs(logits[num_sampled:], step) if num_sampled < len(all_rows) else {},
        )

    def _replay(self, step: StepInput) -> torch.Tensor | None:
        """Logits of a decode-only step from the CUDA graphs; None for steps they don't take."""
        requests = step.requests
        if self.cuda_graphs is None or not requests:
            return None
        if any(r.num_tokens != 1 or r.sampling is None for r in requests):
            return None
        return self.cuda_graphs.run(
            [r.token_ids[0] for r in requests],
            [r.context_len for r in requests],
            [r.page_ids for r in requests],
        )

    def forward_context(
        self,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        state_slots: list[int] | None = None,
        verify_slots: list[list[int]] | None = None,
    ) -> ForwardContext:
        """The step's context over this runner's caches: `query_lens[i]` tokens of request i
        after its `context_lens[i]` cached ones, on pages `page_tables[i]`, in state slot
        `state_slots[i]` (hybrid models; a verify run also in `verify_slots[i]`)."""
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
            verify_slots,
        )

    def _prepare_inputs(self, step: StepInput) -> tuple[torch.Tensor, ForwardContext]:
        token_ids = [t for r in step.requests for t in r.token_ids]
        hybrid = self.state_cache is not None
        ctx = self.forward_context(
            [r.num_tokens for r in step.requests],
            [r.context_len for r in step.requests],
            [r.page_ids for r in step.requests],
            [r.state_slot for r in step.requests] if hybrid else None,
            [r.verify_state_slots for r in step.requests] if hybrid else None,
        )
        return torch.tensor(token_ids, dtype=torch.long, device=self.device), ctx

    def _sample(
        self, logits: torch.Tensor, requests: list[ScheduledRequest]
    ) -> dict[str, list[SampledToken]]:
        """Each sample row draws with its request's settings; a request's rows come in order
        (the continuation of its last token, then of each draft) with the history up to them."""
        rows = [(r, r.sampling, _history(r, i)) for r in requests for i in range(r.num_sample_rows)]
        self._suppress_early_stops(logits, [(s, out) for _, s, out in rows])
        sampling = SamplingBatch.build(
            params=[s.params for _, s, _ in rows],
            generators=[self._generator(s.params, len(out)) for _, s, out in rows],
            prompt_ids=[s.prompt_token_ids for _, s, _ in rows],
            output_ids=[out for _, _, out in rows],
            device=self.device,
            allowed=self._grammar_masks(rows, logits.shape[-1]),
        )
        out = self.sampler(logits, sampling)
        token_ids = out.token_ids.tolist()
        logprobs = _token_logprobs(out, [s.params for _, s, _ in rows])
        sampled: dict[str, list[SampledToken]] = {}
        for (request, _, _), token_id, logprob in zip(rows, token_ids, logprobs):
            sampled.setdefault(request.request_id, []).append(SampledToken(token_id, logprob))
        return sampled

    def _grammar_masks(
        self, rows: list[tuple[ScheduledRequest, SamplingRow, list[int]]], vocab_size: int
    ) -> torch.Tensor | None:
        """Bits of the tokens each row's grammar allows next; None when no row has a grammar.
        A row after a draft its grammar refuses stays unconstrained: the model rejects that
        draft, so what the row samples is dropped."""
        if not any(s.params.structured is not None for _, s, _ in rows):
            return None
        bitmask = allocate_bitmask(len(rows), vocab_size)
        for index, (request, sampling, history) in enumerate(rows):
            state = self._grammar_state(request.request_id, sampling.params)
            if state is not None and state.follow(history):
                state.fill_mask(bitmask, index)
        for request, sampling, _ in rows:  # drafts are checked: back to the committed tokens
            if (state := self._grammar_states.get(request.request_id)) is not None:
                state.rollback_to(len(sampling.output_token_ids))
        return bitmask

    def _grammar_state(self, request_id: str, params: SamplingParams) -> GrammarState | None:
        if params.structured is None:
            return None
        if request_id not in self._grammar_states:
            assert self.grammars is not None, (
                "a constrained request reached a runner without grammars"
            )
            self._grammar_states[request_id] = self.grammars.matcher(params.structured)
        return self._grammar_states[request_id]

    def _generator(self, params: SamplingParams, position: int) -> torch.Generator | None:
        """A seeded request draws its output token `position` from a generator seeded by
        (seed, position) alone: the same draw whatever else runs in the step, and whether the
        row checks a draft or is a plain decode, so speculation never changes a seeded output."""
        if params.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(_position_seed(params.seed, position))

    def _suppress_early_stops(
        self, logits: torch.Tensor, rows: list[tuple[SamplingRow, list[int]]]
    ) -> None:
        """`min_tokens`: a request may not stop (EOS or a stop token id) before it has that many."""
        for row, (sampling, output_ids) in enumerate(rows):
            if len(output_ids) < sampling.params.min_tokens:
                stops = list(self.eos_token_ids | set(sampling.params.stop_token_ids))
                logits[row, stops] = float("-inf")


def _position_seed(seed: int, position: int) -> int:
    # An odd 64-bit multiplier (the golden ratio's) spreads consecutive positions apart.
    return (seed + position * 0x9E3779B97F4A7C15) % 2**64


def _sample_rows(step: StepInput) -> list[int]:
    """Flat token rows whose logits sample: the last `num_sample_rows` of each request's."""
    rows, end = [], 0
    for r in step.requests:
        end += r.num_tokens
        rows.extend(range(end - r.num_sample_rows, end))
    return rows


def _prompt_rows(step: StepInput) -> list[int]:
    """Flat token rows whose logits give prompt logprobs: each request's first, one per target."""
    rows, start = [], 0
    for r in step.requests:
        rows.extend(range(start, start + len(r.prompt_targets)))
        start += r.num_tokens
    return rows


def _prompt_logprobs(logits: torch.Tensor, step: StepInput) -> dict[str, list[TokenLogprob]]:
    """Each prompt target's logprob under the raw logits of the row before it, with the top
    alternatives its request wants."""
    wanting = [r for r in step.requests if r.prompt_targets]
    targets = torch.tensor([t for r in wanting for t in r.prompt_targets], device=logits.device)
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    k = max(r.num_prompt_alternatives for r in wanting)
    top_values, top_ids = (v.tolist() for v in logprobs.topk(k, dim=-1)) if k else ([], [])
    result, row = {}, 0
    for r in wanting:
        n, k_r = len(r.prompt_targets), r.num_prompt_alternatives
        result[r.request_id] = [
            TokenLogprob(
                token,
                chosen[row + i],
                list(zip(top_ids[row + i][:k_r], top_values[row + i][:k_r])) if k_r else [],
            )
            for i, token in enumerate(r.prompt_targets)
        ]
        row += n
    return result


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
