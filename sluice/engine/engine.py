"""The synchronous engine: add requests, call `step()` until they finish, read their outputs."""

from __future__ import annotations

import logging

import torch

from sluice.config import CacheConfig, EngineConfig
from sluice.engine.cache_manager import KVCacheManager, PagePool
from sluice.engine.executor import Executor
from sluice.engine.model_runner import ModelRunner, kv_bytes_per_page, state_bytes_per_slot
from sluice.engine.output import RequestOutput, TextStream
from sluice.engine.prefix_cache import PrefixCache
from sluice.engine.request import FinishReason, PreparedRequest, Request, TokenLogprob
from sluice.engine.scheduler import RequestUpdate, Scheduler
from sluice.engine.state_pool import StatePool
from sluice.loaders.model_path import resolve_model
from sluice.models.registry import LoadedModel, load_model
from sluice.sampling_params import InvalidParameterError, SamplingParams
from sluice.sparse.decoding import SparseDecoding
from sluice.sparse.profile import SparsityProfile

logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, config: EngineConfig | None = None, loaded: LoadedModel | None = None
    ) -> None:
        """`loaded` reuses a model already in memory; this engine gets caches of its own."""
        self.config = config = config or EngineConfig()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = config.torch_device()
        dtype = config.torch_dtype(self.device)
        loaded = loaded or load_model(
            resolve_model(config.model), self.device, dtype, config.quantization
        )
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        page_size = config.cache.page_size
        self.state_pool = _state_pool(config.cache, loaded, dtype)
        kv_budget = config.cache.memory_budget_bytes
        if self.state_pool is not None:
            kv_budget -= self.state_pool.num_slots * state_bytes_per_slot(loaded.model, dtype)
        kv_dtype = config.cache.kv_dtype(dtype, self.device)
        num_pages = config.cache.num_pages or max(
            1, kv_budget // kv_bytes_per_page(loaded.config, page_size, kv_dtype)
        )
        self.pool = PagePool(num_pages)
        self.prefix_cache = (
            PrefixCache(self.pool, page_size, self.state_pool)
            if config.cache.enable_prefix_cache
            else None
        )
        self.kv = KVCacheManager(self.pool, page_size, self.prefix_cache, self.state_pool)
        self.scheduler = Scheduler(config.scheduler, self.kv, loaded.tokenizer.eos_token_ids)
        self.executor: Executor = ModelRunner(
            loaded.model,
            self.device,
            dtype,
            kv_dtype,
            num_pages,
            page_size,
            loaded.tokenizer.eos_token_ids,
            self.state_pool,
            config.compile,
            _sparse_decoding(config, loaded),
        )
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings, self.kv.capacity_tokens
        )
        self._requests: dict[str, list[Request]] = {}  # client request id -> its n sequences
        self._streams: dict[Request, TextStream] = {}
        logger.info(
            "KV cache: %d pages of %d tokens, %s, on %s",
            num_pages,
            page_size,
            kv_dtype,
            self.device,
        )
        if self.state_pool is not None:
            logger.info("state pool: %d slots", self.state_pool.num_slots)

    # ---- requests in -------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, checked against the vocabulary and the context window."""
        token_ids = self._prompt_ids(prompt)
        if not token_ids:
            raise InvalidParameterError("prompt", "prompt is empty")
        if len(token_ids) >= self.max_model_len:  # before looking at each id of a huge list
            raise InvalidParameterError(
                "prompt",
                f"prompt has {len(token_ids)} tokens but the context window is "
                f"{self.max_model_len} tokens (at least one must be left to generate)",
            )
        vocab_size = self.model_config.vocab_size
        if not all(_is_int(t) and 0 <= t < vocab_size for t in token_ids):
            raise InvalidParameterError(
                "prompt", f"prompt token ids must be integers in [0, {vocab_size})"
            )
        return token_ids

    def _prompt_ids(self, prompt: object) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise InvalidParameterError(
            "prompt", f"a prompt is a string or a list of token ids, got {type(prompt).__name__}"
        )

    def make_request(
        self, prompt_ids: list[int], params: SamplingParams, cache_salt: str = ""
    ) -> PreparedRequest:
        """Validate `params` against this model; `prompt_ids` come from `encode_prompt`."""
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(
                "params", f"expected SamplingParams, got {type(params).__name__}"
            )
        params.validate()
        vocab_size = self.model_config.vocab_size
        if any(t >= vocab_size for t in params.stop_token_ids):
            raise InvalidParameterError(
                "stop_token_ids", f"stop_token_ids must be token ids in [0, {vocab_size})"
            )
        return PreparedRequest(prompt_ids, params, cache_salt)

    def prepare(
        self, prompt: str | list[int], params: SamplingParams, cache_salt: str = ""
    ) -> PreparedRequest:
        """Validate and encode once, at the edge; raises InvalidParameterError naming what is
        wrong. `cache_salt` namespaces the prefix cache: only requests with the same salt share
        KV."""
        return self.make_request(self.encode_prompt(prompt), params, cache_salt)

    def add_request(self, request_id: str, prepared: PreparedRequest) -> None:
        """Queue a prepared request as its `n` sequences."""
        if request_id in self._requests:
            raise InvalidParameterError(
                "request_id", f"request id {request_id!r} is already in use"
            )
        params = prepared.params
        sequences = [
            self._new_sequence(request_id, i, prepared, params.for_sample(i))
            for i in range(params.n)
        ]
        for seq in sequences:
            self.scheduler.add(seq)
            self._streams[seq] = TextStream(self.tokenizer, seq.params)
        self._requests[request_id] = sequences

    def _new_sequence(
        self, request_id: str, index: int, prepared: PreparedRequest, params: SamplingParams
    ) -> Request:
        return Request(
            request_id=f"{request_id}#{index}",
            prompt_token_ids=prepared.prompt_token_ids,
            params=params,
            max_total_tokens=self.max_model_len,
            parent_id=request_id,
            index=index,
            cache_salt=prepared.cache_salt,
        )

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Cancel all samples of a request, free their pages, and say so in a final output."""
        outputs = []
        for seq in self._requests.get(request_id, []):
            if not seq.is_finished:
                outputs.append(self._finish(seq, FinishReason.ABORT))
        return outputs

    def abort_all_requests(self) -> list[str]:
        """Abort every request in flight; returns their ids."""
        request_ids = list(self._requests)
        for request_id in request_ids:
            self.abort_request(request_id)
        return request_ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        output = self.executor.execute(batch.step)
        return [self._output(update) for update in self.scheduler.update(batch, output)]

    def _output(self, update: RequestUpdate) -> RequestOutput:
        """Text for the new tokens; a stop string in it ends the request."""
        req = update.request
        if self._hits_stop_string(req, update):
            if req.is_finished:  # the same token reached max_tokens: the stop string says why
                req.finish_reason = FinishReason.STOP
            else:
                self.scheduler.finish(req, FinishReason.STOP)
        if req.is_finished:
            return self._finished_output(req, update.new_token_ids, update.logprobs)
        return self._request_output(req, update.new_token_ids, update.logprobs)

    def _hits_stop_string(self, req: Request, update: RequestUpdate) -> bool:
        """Feed the new tokens' text to the request's stream, all but a stop token (EOS or a
        stop id, which ends the text unwritten); True when a stop string completed."""
        tokens = update.new_token_ids
        if update.finish_reason == FinishReason.STOP:
            tokens = tokens[:-1]
        stream = self._streams[req]
        return any(stream.add_token(token) for token in tokens)

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        self.scheduler.finish(req, reason)
        return self._finished_output(req, [], [])

    def _finished_output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        self._streams[req].finish()
        output = self._request_output(req, tokens, logprobs)
        del self._streams[req]
        siblings = self._requests[req.parent_id]
        if all(s not in self._streams for s in siblings):  # the last one's final output
            del self._requests[req.parent_id]
        return output

    def _request_output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.parent_id,
            index=req.index,
            new_token_ids=tokens,
            new_text=self._streams[req].take_delta(final=req.is_finished),
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            logprobs=logprobs,
            queue_time=req.queue_time,
        )


def _state_pool(cache: CacheConfig, loaded: LoadedModel, dtype: torch.dtype) -> StatePool | None:
    """Hybrid models: as many state slots as their share of the cache memory holds."""
    if not loaded.config.is_hybrid:
        return None
    slot_bytes = state_bytes_per_slot(loaded.model, dtype)
    budget = int(cache.memory_budget_bytes * cache.state_pool_ratio)
    return StatePool(cache.num_state_slots or max(1, budget // slot_bytes))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sparse_decoding(config: EngineConfig, loaded: LoadedModel) -> SparseDecoding | None:
    if config.sparsity is None:
        return None
    profile = SparsityProfile.load(config.sparsity)
    sparse = SparseDecoding(loaded.model, profile, config.sparsity_rule)
    logger.info(
        "sparse decoding (%s): mean calibrated sparsity %.0f%% at CETT %g",
        sparse.rule,
        100 * profile.mean_sparsity,
        profile.target_cett,
    )
    return sparse
