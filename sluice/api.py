"""The Python entry point: `LLM(model=...)`, then `generate`, `chat` or `stream`."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.engine.output import RequestOutput
from sluice.engine.request import PreparedRequest, TokenLogprob
from sluice.loaders.tokenizer import Tokenizer
from sluice.sampling_params import InvalidParameterError, SamplingParams

Message = dict[str, object]
Prompt = str | list[int]


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # with SamplingParams.prompt_logprobs

    def add(self, out: RequestOutput) -> None:
        """Accumulate one step's output of this sample."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason = out.finish_reason.value


@dataclass
class GenerationResult:
    request_id: str
    outputs: list[Completion]
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.outputs[out.index].add(out)
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens


class LLM:
    def __init__(self, model: str | None = None, **options: object) -> None:
        """`options` are EngineConfig.create's: device, dtype, max_model_len, page_size, ..."""
        self._attach(Engine(EngineConfig.create(model, **options)))

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()
        # Outputs not yet read, per request: a step serves every request in flight, and each
        # caller (a generate call, each open stream) reads only its own.
        self._outboxes: dict[str, deque[RequestOutput]] = {}

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Run a batch to completion; results come back in prompt order. A bad prompt or
        setting raises InvalidParameterError before anything is queued."""
        prompts = _as_prompt_list(prompts)
        params_list = _broadcast(params, len(prompts))
        prepared = [self.engine.prepare(prompt, p) for prompt, p in zip(prompts, params_list)]
        results = {
            request_id: GenerationResult(request_id, [Completion(i) for i in range(p.n)])
            for request_id, p in zip(self._submit(prepared), params_list)
        }
        bar = tqdm(total=len(prompts), desc="generating", disable=not progress)
        try:
            unfinished = set(results)
            while unfinished:
                self._step()
                for request_id in list(unfinished):
                    if self._collect(request_id, results[request_id]):
                        unfinished.discard(request_id)
                        bar.update(1)
        finally:
            bar.close()
            self._abort(results)
        return list(results.values())

    def chat(
        self,
        conversations: list[Message] | list[list[Message]],
        params: SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """One conversation (a list of messages) or several; answers the last message of each."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not conversations or not all(conversations):
            raise InvalidParameterError("messages", "a conversation needs at least one message")
        prompts = [self.chat_prompt(messages) for messages in conversations]
        return self.generate(prompts, params)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield each step's output for one prompt as it is produced. Streams may be read
        interleaved (and beside `generate`): each gets exactly its own outputs."""
        params = params or SamplingParams()
        (request_id,) = self._submit([self.engine.prepare(prompt, params)])
        outbox = self._outboxes[request_id]
        remaining = params.n
        try:
            while remaining:
                while not outbox:
                    self._step()
                out = outbox.popleft()
                remaining -= out.finished
                yield out
        finally:
            self._abort([request_id])

    def _submit(self, prepared: list[PreparedRequest]) -> list[str]:
        request_ids = [str(next(self._ids)) for _ in prepared]
        for request_id, request in zip(request_ids, prepared):
            self.engine.add_request(request_id, request)
            self._outboxes[request_id] = deque()
        return request_ids

    def _step(self) -> None:
        """One engine step, its outputs sorted into their requests' outboxes."""
        if not self.engine.has_unfinished_requests():  # would never deliver: fail, don't spin
            raise RuntimeError("waiting for outputs, but the engine has no request in flight")
        for out in self.engine.step():
            outbox = self._outboxes.get(out.request_id)
            if outbox is not None:
                outbox.append(out)

    def _collect(self, request_id: str, result: GenerationResult) -> bool:
        """Add what arrived for a request to its result; True once all its samples finished."""
        outbox = self._outboxes[request_id]
        while outbox:
            result.add(outbox.popleft())
        return _all_finished(result)

    def _abort(self, request_ids: Iterable[str]) -> None:
        """Forget these requests, aborting what still runs (no-op for finished ones)."""
        for request_id in request_ids:
            self.engine.abort_request(request_id)
            self._outboxes.pop(request_id, None)


def chat_prompt_ids(
    tokenizer: Tokenizer,
    messages: list[Message],
    allow_special_tokens_in_content: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt that asks the model to answer the last of `messages`, offering it `tools`;
    special-token text in their content is encoded as text unless
    `allow_special_tokens_in_content`."""
    return tokenizer.encode_chat(
        messages,
        add_generation_prompt=True,
        allow_special_tokens_in_content=allow_special_tokens_in_content,
        **({"tools": tools} if tools else {}),
    )


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (bytes, bytearray)):
        raise InvalidParameterError("prompt", "a prompt is text (str) or token ids, not bytes")
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _broadcast(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    if len(params) != count:
        raise InvalidParameterError(
            "params", f"got {len(params)} SamplingParams for {count} prompts"
        )
    return list(params)


def _all_finished(result: GenerationResult) -> bool:
    return all(c.finish_reason is not None for c in result.outputs)
