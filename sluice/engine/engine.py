"""The synchronous engine: add requests, call `step()` until they finish, read their outputs."""

from __future__ import annotations

import dataclasses
import logging

import torch

from sluice.config import CacheConfig, EngineConfig, ModelConfig
from sluice.disagg.params import RemotePrefill, TransferRequest
from sluice.disagg.role import DisaggConfig, Disaggregation
from sluice.engine.cache_manager import KVCacheManager, PagePool
from sluice.engine.cuda_graphs import GraphShape
from sluice.engine.executor import Executor
from sluice.engine.model_runner import ModelRunner, kv_bytes_per_page, state_bytes_per_slot
from sluice.engine.output import RequestOutput, TextStream
from sluice.engine.prefix_cache import PrefixCache
from sluice.engine.request import FinishReason, PreparedRequest, Request, TokenLogprob
from sluice.engine.scheduler import RequestUpdate, Scheduler
from sluice.engine.state_pool import StatePool
from sluice.loaders.model_path import resolve_model
from sluice.models.registry import LoadedModel, load_model
from sluice.sampling_params import CONTEXT_LENGTH_EXCEEDED, InvalidParameterError, SamplingParams
from sluice.sparse.decoding import SparseDecoding
from sluice.sparse.profile import SparsityProfile
from sluice.spec.policy import DraftPolicy
from sluice.spec.proposer import make_proposer
from sluice.structured.grammar import GrammarCompiler

logger = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
        disagg: DisaggConfig | None = None,
    ) -> None:
        """`loaded` reuses a model already in memory; this engine gets caches of its own.
        `disagg`: its role in prefill/decode disaggregation (none: it does both)."""
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
        self.proposer = make_proposer(config, loaded, num_pages)
        self.draft_policy = DraftPolicy(
            config.speculative.num_speculative_tokens, config.speculative.draft_row_cost
        )
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.config.vocab_size)
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
            _graph_shape(config, loaded.config, num_pages, page_size, self.device),
            self.grammars,
            sparse=_sparse_decoding(config, loaded),
        )
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position_embeddings, self.kv.capacity_tokens
        )
        self.disagg = (
            Disaggregation(disagg, self) if disagg is not None and disagg.role != "both" else None
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
                code=CONTEXT_LENGTH_EXCEEDED,
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
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_salt: str = "",
        transfer: TransferRequest | None = None,
    ) -> PreparedRequest:
        """Validate `params` (and a disaggregated request's `transfer`) against this model and
        role; `prompt_ids` come from `encode_prompt`."""
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError(
                "params", f"expected SamplingParams, got {type(params).__name__}"
            )
        if transfer is not None and transfer.remote_decode:
            params = _first_token_only(params)
        params.validate()
        vocab_size = self.model_config.vocab_size
        if any(t >= vocab_size for t in params.stop_token_ids):
            raise InvalidParameterError(
                "stop_token_ids", f"stop_token_ids must be token ids in [0, {vocab_size})"
            )
        if any(t >= vocab_size for t in params.logit_bias):
            raise InvalidParameterError(
                "logit_bias", f"logit_bias keys must be token ids in [0, {vocab_size})"
            )
        if params.structured is not None:
            self.grammars.compile(params.structured)  # a constraint that cannot compile: refused
        if transfer is not None:
            check_transfer(self.disagg, transfer, prompt_ids, params)
        return PreparedRequest(prompt_ids, params, cache_salt, transfer)

    def prepare(
        self, prompt: str | list[int], params: SamplingParams, cache_salt: str = ""
    ) -> PreparedRequest:
        """Validate and encode once, at the edge; raises InvalidParameterError naming what is
        wrong. `cache_salt` namespaces the prefix cache: only requests with the same salt share
        KV."""
        return self.make_request(self.encode_prompt(prompt), params, cache_salt)

    def add_request(self, request_id: str, prepared: PreparedRequest) -> list[RequestOutput]:
        """Queue a prepared request as its `n` sequences. Returns the outputs it has at once:
        a disaggregated decode's first token, sampled by the prefill instance."""
        if request_id in self._requests:
            raise InvalidParameterError(
                "request_id", f"request id {request_id!r} is already in use"
            )
        params = prepared.params
        sequences = [
            self._new_sequence(request_id, i, prepared, params.for_sample(i))
            for i in range(params.n)
        ]
        self._requests[request_id] = sequences
        transfer = prepared.transfer
        outputs = []
        for seq in sequences:
            self._streams[seq] = TextStream(self.tokenizer, seq.params)
            if transfer is not None and transfer.remote_prefill is not None:
                outputs.append(self._add_prefilled(seq, transfer.remote_prefill))
            else:
                if transfer is not None and transfer.remote_decode:
                    self._keep_for_remote_decode(seq, transfer)
                elif transfer is not None:  # D under sglang-router: P's params are to come
                    seq.pending_prefill = transfer.pending
                self.scheduler.add(seq)
        return outputs

    def _keep_for_remote_decode(self, seq: Request, transfer: TransferRequest) -> None:
        """A prefill instance computes the prompt, samples one token and keeps the KV."""
        seq.keep_kv = True
        seq.room = transfer.room

    def _add_prefilled(self, seq: Request, prefill: RemotePrefill) -> RequestOutput:
        """Queue a sequence whose prompt's KV comes from a prefill instance; its first token
        (sampled there) goes out now, before the transfer (early first token)."""
        seq.remote_prefill = prefill
        reason = self.scheduler.add_prefilled(seq, prefill.first_token_id)
        return self._first_token_output(seq, reason)

    def _first_token_output(self, seq: Request, reason: FinishReason | None) -> RequestOutput:
        prefill = seq.remote_prefill
        logprob = prefill.first_logprob if seq.params.logprobs is not None else None
        update = RequestUpdate(seq, [prefill.first_token_id], [logprob] if logprob else [], reason)
        return self._output(update)

    def _transfer_outputs(self) -> list[RequestOutput]:
        """D: the first tokens of requests whose P params just came (sglang-router admits them
        before), and the requests whose transfer failed for good."""
        news = self.disagg.poll()
        outputs = []
        for seq in news.arrived:
            reason = self.scheduler.prefilled(seq, seq.remote_prefill.first_token_id)
            outputs.append(self._first_token_output(seq, reason))
        for seq, error in news.failed:
            output = self._finish(seq, FinishReason.ABORT)
            output.error = error
            outputs.append(output)
        return outputs

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
    def idle_poll_seconds(self) -> float | None:
        """With nothing to step, how soon `step` still has work (KV transfers): None, never."""
        return self.disagg.idle_poll_seconds if self.disagg is not None else None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        outputs = self._transfer_outputs() if self.disagg is not None else []
        batch = self.scheduler.schedule()
        if self.proposer is not None:
            for request in batch.preempted:
                self.proposer.preempted(request)
        if not batch.requests:
            if self.disagg is not None:
                self.disagg.wait()
            return outputs
        output = self.executor.execute(batch.step)
        return outputs + [self._output(update) for update in self.scheduler.update(batch, output)]

    def _propose(self) -> None:
        """Drafts for the running requests that have caught up (one pending token), as many as
        each one's acceptance rate pays for (spec/policy.py), none while so many run that
        verifying drafts would cost more than it saves."""
        running = self.scheduler.running
        if len(running) > self.config.speculative.disable_batch_size:
            return
        ready = [r for r in running if r.num_pending_tokens == 1 and r.params.speculative]
        wanted = [self.draft_policy.num_drafts(r.draft_acceptance, len(running)) for r in ready]
        ready, wanted = [r for r, n in zip(ready, wanted) if n], [n for n in wanted if n]
        if not ready:
            return
        for request, drafts, count in zip(ready, self.proposer.propose(ready, max(wanted)), wanted):
            request.spec_token_ids = drafts[:count]

    def _output(self, update: RequestUpdate) -> RequestOutput:
        """Text for the new tokens; a stop string in it ends the request at the token that
        completed it (later tokens of the same step, accepted drafts, are dropped)."""
        req = update.request
        kept = self._stop_string_end(req, update)
        if kept is not None:
            self.scheduler.cut_output(
                req, len(req.output_token_ids) - len(update.new_token_ids) + kept
            )
            del update.new_token_ids[kept:], update.logprobs[kept:]
            if req.is_finished:  # the same step reached max_tokens: the stop string says why
                req.finish_reason = FinishReason.STOP
            else:
                self.scheduler.finish(req, FinishReason.STOP)
        if req.is_finished:
            return self._finished_output(req, update.new_token_ids, update.logprobs)
        return self._request_output(req, update.new_token_ids, update.logprobs)

    def _stop_string_end(self, req: Request, update: RequestUpdate) -> int | None:
        """Feed the new tokens' text to the request's stream, all but a stop token (EOS or a
        stop id, which ends the text unwritten); how many of them are kept when a stop string
        completed, None when none did."""
        tokens = update.new_token_ids
        if update.finish_reason == FinishReason.STOP:
            tokens = tokens[:-1]
        stream = self._streams[req]
        for position, token in enumerate(tokens):
            if stream.add_token(token):
                return position + 1
        return None

    def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
        self.scheduler.finish(req, reason)
        return self._finished_output(req, [], [])

    def _finished_output(
        self, req: Request, tokens: list[int], logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        self._streams[req].finish()
        if self.proposer is not None:
            self.proposer.finished(req)
        output = self._request_output(req, tokens, logprobs)
        if self.disagg is not None:
            output.kv_transfer_params = self.disagg.finished(req, logprobs[0] if logprobs else None)
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
            prompt_logprobs=req.prompt_logprobs if _is_first(req, tokens) else None,
        )


def check_transfer(
    disagg: Disaggregation | None,
    transfer: TransferRequest,
    prompt_ids: list[int],
    params: SamplingParams,
) -> None:
    """A request's `kv_transfer_params` must fit this engine's role and the request."""
    role = "both" if disagg is None else disagg.config.role
    wanted = "prefill" if transfer.remote_decode else "decode"
    if role != wanted:
        raise InvalidParameterError(
            "kv_transfer_params",
            f"this server's role is {role}; a request "
            + ("for a remote decode" if transfer.remote_decode else "with a remote prefill")
            + f" goes to a server started with --role {wanted}",
        )
    if params.n != 1:
        raise InvalidParameterError("n", "a disaggregated request takes n=1")
    if transfer.remote_prefill is not None:
        transfer.remote_prefill.check_prompt(len(prompt_ids))


def _first_token_only(params: SamplingParams) -> SamplingParams:
    """What a prefill instance samples for a remote decode: the first token alone. The routers
    send P the client's request (sglang-router its max_tokens, vllm-router 1 and the client's
    min_tokens): the limits are D's to keep, but a min_tokens keeps EOS from being the first."""
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))


def _state_pool(cache: CacheConfig, loaded: LoadedModel, dtype: torch.dtype) -> StatePool | None:
    """Hybrid models: as many state slots as their share of the cache memory holds."""
    if not loaded.config.is_hybrid:
        return None
    slot_bytes = state_bytes_per_slot(loaded.model, dtype)
    budget = int(cache.memory_budget_bytes * cache.state_pool_ratio)
    return StatePool(cache.num_state_slots or max(1, budget // slot_bytes))


def _is_first(req: Request, tokens: list[int]) -> bool:
    """Whether `tokens` are the first the request output, when it wants prompt logprobs."""
    return req.params.prompt_logprobs is not None and 0 < len(tokens) == len(req.output_token_ids)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _graph_shape(
    config: EngineConfig,
    model_config: ModelConfig,
    num_pages: int,
    page_size: int,
    device: torch.device,
) -> GraphShape | None:
    """CUDA graphs' buffer sizes, with one scratch page past the scheduler's; None off CUDA and
    for hybrid models (their recurrent state is not in the graphs)."""
    if device.type != "cuda" or not config.cuda_graphs or model_config.is_hybrid:
        return None
    max_len = min(
        config.max_model_len or model_config.max_position_embeddings, num_pages * page_size
    )
    return GraphShape(
        config.scheduler.max_num_seqs, -(-max_len // page_size), num_pages + 1, page_size
    )


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
