"""The synchronous engine: add requests, call `step()` until they finish, read their outputs."""

from __future__ import annotations

import logging

import torch

from sluice.config import CacheConfig, EngineConfig
from sluice.engine.cache_manager import KVCacheManager, PagePool
from sluice.engine.model_runner import (
    ModelRunner,
    SampledToken,
    kv_bytes_per_page,
    state_bytes_per_slot,
)
from sluice.engine.output import RequestOutput, TextStream
from sluice.engine.prefix_cache import PrefixCache
from sluice.engine.request import FinishReason, Request, TokenLogprob
from sluice.engine.scheduler import Scheduler
from sluice.engine.state_pool import StatePool
from sluice.loaders.model_path import resolve_model
from sluice.models.registry import LoadedModel, load_model
from sluice.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, config: EngineConfig | None = None, loaded: LoadedModel | None = None
    ) -> None:
        """`loaded` reuses a model already in memory (its KV cache is rebound to this engine)."""
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
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(
            loaded.model,
            self.device,
            dtype,
            kv_dtype,
            num_pages,
            page_size,
            loaded.tokenizer.eos_token_ids,
            self.state_pool,
            config.compile,
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
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise InvalidParameterError("prompt", "prompt is empty")
        if any(
            not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size for t in token_ids
        ):
            raise InvalidParameterError(
                "prompt", f"prompt token ids must be in [0, {self.model_config.vocab_size})"
            )
        if len(token_ids) >= self.max_model_len:
            raise InvalidParameterError(
                "prompt",
                f"prompt has {len(token_ids)} tokens but the context window is "
                f"{self.max_model_len} tokens (at least one must be left to generate)",
            )
        return token_ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str = "",
    ) -> None:
        """Validate and queue; raises InvalidParameterError and leaves the engine untouched.

        `cache_salt` namespaces the prefix cache: only requests with the same salt share KV.
        """
        if request_id in self._requests:
            raise InvalidParameterError(
                "request_id", f"request id {request_id!r} is already in use"
            )
        params.validate()
        token_ids = self.encode_prompt(prompt)
        sequences = [
            self._new_sequence(request_id, i, token_ids, params.for_sample(i))
            for i in range(params.n)
        ]
        for seq in sequences:
            seq.cache_salt = cache_salt
            self.scheduler.add(seq)
            self._streams[seq] = TextStream(self.tokenizer, seq.params)
        self._requests[request_id] = sequences

    def _new_sequence(
        self, request_id: str, index: int, token_ids: list[int], params: SamplingParams
    ) -> Request:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        return Request(
            request_id=f"{request_id}#{index}",
            prompt_token_ids=token_ids,
            params=params,
            max_total_tokens=self.max_model_len,
            parent_id=request_id,
            index=index,
            generator=generator,
        )

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Cancel all samples of a request, free their pages, and say so in a final output."""
        outputs = []
        for seq in self._requests.get(request_id, []):
            if not seq.is_finished:
                outputs.append(self._finish(seq, FinishReason.ABORT, [], []))
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
        sampled = self.runner.execute(batch)
        for req, n in zip(batch.requests, batch.num_tokens):
            req.num_computed_tokens += n
            self.kv.cache_computed(req)
        return [self._append_token(s) for s in sampled]

    def _append_token(self, sampled: SampledToken) -> RequestOutput:
        req, token = sampled.request, sampled.token_id
        req.output_token_ids.append(token)
        logprobs = [sampled.logprob] if sampled.logprob is not None else []
        reason = self._token_stop_reason(req, token)
        if reason != FinishReason.STOP and self._streams[req].add_token(token):
            reason = FinishReason.STOP
        if reason is not None:
            return self._finish(req, reason, [token], logprobs)
        return self._output(req, [token], logprobs, finished=False)

    def _token_stop_reason(self, req: Request, token: int) -> FinishReason | None:
        params = req.params
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.tokenizer.eos_token_ids
        ):
            return FinishReason.STOP
        if len(req.output_token_ids) >= params.max_tokens or req.num_tokens >= req.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(
        self, req: Request, reason: FinishReason, tokens: list[int], logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        req.finish_reason = reason
        self.scheduler.finish(req)
        self._streams[req].finish()
        output = self._output(req, tokens, logprobs, finished=True)
        del self._streams[req]
        siblings = self._requests[req.parent_id]
        if all(s.is_finished for s in siblings):
            del self._requests[req.parent_id]
        return output

    def _output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob], finished: bool
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.parent_id,
            index=req.index,
            new_token_ids=tokens,
            new_text=self._streams[req].take_delta(final=finished),
            finished=finished,
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
