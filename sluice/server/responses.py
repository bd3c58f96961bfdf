"""Engine outputs shaped as OpenAI responses: whole, or as server-sent events.

Chat and completions differ only in how a choice, its logprobs and the envelope look; a
`ChoiceFormat` says that, and `stream_events` / `collect` do the rest for both: choice order,
usage, logprobs accumulation and errors that happen after the response has started.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from sluice.api import Completion
from sluice.engine.output import RequestOutput
from sluice.engine.request import TokenLogprob
from sluice.loaders.tokenizer import Tokenizer
from sluice.server.errors import as_api_error, error_body
from sluice.server.generation import ChoiceOutput, Generation
from sluice.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Delta,
    DeltaToolCall,
    FunctionCall,
    PromptLogprob,
    PromptTokensDetails,
    ToolCall,
    TopLogprob,
    Usage,
)
from sluice.server.tools import NO_TOOLS, CallStream, ParsedCall, ToolChoice, parse_calls

logger = logging.getLogger(__name__)


@dataclass
class ResponseMeta:
    id: str
    model: str
    prompt_lengths: list[int]
    n: int  # samples per prompt
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_choices(self) -> int:
        return len(self.prompt_lengths) * self.n


class ChoiceFormat(ABC):
    """How one API shapes its choices. Chunk methods see one output's news for one choice."""

    counts_completion = True  # whether generated tokens count in usage (not for max_tokens 0)

    def __init__(self, tokenizer: Tokenizer, with_logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.with_logprobs = with_logprobs

    def opening_chunk(self, meta: ResponseMeta) -> BaseModel | None:
        """What to send before the first token, if anything."""
        return None

    @abstractmethod
    def chunk(self, meta: ResponseMeta, item: ChoiceOutput, text: str) -> BaseModel: ...

    @abstractmethod
    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> BaseModel: ...

    @abstractmethod
    def response(
        self, meta: ResponseMeta, choices: list[Completion], usage: Usage
    ) -> BaseModel: ...

    def prefix(self, meta: ResponseMeta, choice: int) -> str:
        """Text that goes before a choice's generated text (completions' echo)."""
        return ""


@dataclass(frozen=True)
class Echo:
    """Completions' `echo`: each prompt's text and token ids go before its choices' output;
    with `logprobs`, the prompt tokens' logprobs too. `generated`: False for `max_tokens` 0,
    whose one token (sampled with the prompt's logprobs) is left out."""

    texts: list[str]
    prompt_ids: list[list[int]]
    generated: bool = True


class CompletionFormat(ChoiceFormat):
    def __init__(
        self,
        tokenizer: Tokenizer,
        with_logprobs: bool,
        echo: Echo | None = None,
        with_prompt_logprobs: bool = False,
    ) -> None:
        """`with_prompt_logprobs`: vLLM's `prompt_logprobs` field in each choice."""
        super().__init__(tokenizer, with_logprobs)
        self._echo = echo
        self._with_prompt_logprobs = with_prompt_logprobs
        self._text_offsets: dict[int, int] = defaultdict(int)  # per choice, across chunks
        self.counts_completion = echo is None or echo.generated

    def prefix(self, meta: ResponseMeta, choice: int) -> str:
        return self._echo.texts[choice // meta.n] if self._echo else ""

    def chunk(self, meta: ResponseMeta, item: ChoiceOutput, text: str) -> BaseModel:
        out = item.output
        if not self.counts_completion:  # max_tokens 0: the prompt alone, in the first chunk
            text = text[: len(self.prefix(meta, item.choice))] if out.prompt_logprobs else ""
        choice = CompletionChoice(
            index=item.choice,
            text=text,
            logprobs=self._logprobs(
                item.choice, out.logprobs, self._prompt(item.prompt, out.prompt_logprobs)
            ),
            finish_reason=_finish_reason(out),
            prompt_logprobs=self._vllm_prompt_logprobs(item.prompt, out.prompt_logprobs),
        )
        return CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, choices=[choice]
        )

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> BaseModel:
        return CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage
        )

    def response(self, meta: ResponseMeta, choices: list[Completion], usage: Usage) -> BaseModel:
        return CompletionResponse(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[self._choice(meta, c) for c in choices],
            usage=usage,
        )

    def _choice(self, meta: ResponseMeta, c: Completion) -> CompletionChoice:
        prompt = c.index // meta.n
        text = c.text if self.counts_completion else self.prefix(meta, c.index)
        return CompletionChoice(
            index=c.index,
            text=text,
            logprobs=self._logprobs(c.index, c.logprobs, self._prompt(prompt, c.prompt_logprobs)),
            finish_reason=c.finish_reason,
            prompt_logprobs=self._vllm_prompt_logprobs(prompt, c.prompt_logprobs),
        )

    def _prompt(
        self, prompt: int, prompt_logprobs: list[TokenLogprob] | None
    ) -> list[TokenLogprob | None]:
        """The echoed prompt's entries: None for its first token, which nothing predicts."""
        if self._echo is None or prompt_logprobs is None:
            return []
        return [TokenLogprob(self._echo.prompt_ids[prompt][0], None, []), *prompt_logprobs]

    def _vllm_prompt_logprobs(
        self, prompt: int, prompt_logprobs: list[TokenLogprob] | None
    ) -> list[dict[str, PromptLogprob] | None] | None:
        if not self._with_prompt_logprobs or prompt_logprobs is None:
            return None
        return [None] + [
            {
                str(t): PromptLogprob(logprob=v, decoded_token=self.tokenizer.id_to_token(t))
                for t, v in [(lp.token_id, lp.logprob), *lp.top]
            }
            for lp in prompt_logprobs
        ]

    def _logprobs(
        self, choice: int, logprobs: list[TokenLogprob], prompt: list[TokenLogprob]
    ) -> CompletionLogprobs | None:
        if not self.with_logprobs:
            return None
        shaped = CompletionLogprobs()
        for lp in prompt + (logprobs if self.counts_completion else []):
            shaped.tokens.append(self._token_name(lp.token_id))
            shaped.token_logprobs.append(lp.logprob)
            top = {self._token_name(t): v for t, v in lp.top}
            shaped.top_logprobs.append(top if lp.logprob is not None else None)
            shaped.text_offset.append(self._text_offsets[choice])
            self._text_offsets[choice] += len(self.tokenizer.id_to_token(lp.token_id))
        return shaped

    def _token_name(self, token_id: int) -> str:
        """The token's text; as OpenAI names it, `bytes:\\xNN...` for one holding part of a
        character, so that the names joined (bytes decoded) rebuild the text."""
        token_bytes = self.tokenizer.token_bytes(token_id)
        try:
            return token_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in token_bytes)


class ChatFormat(ChoiceFormat):
    def __init__(
        self, tokenizer: Tokenizer, with_logprobs: bool, tools: ToolChoice = NO_TOOLS
    ) -> None:
        super().__init__(tokenizer, with_logprobs)
        self._tools = tools
        self._calls: dict[int, CallStream] = {}  # per streamed choice

    def opening_chunk(self, meta: ResponseMeta) -> BaseModel:
        # OpenAI's first chunk of each choice carries the role, before any content.
        choices = [
            ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
            for i in range(meta.num_choices)
        ]
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices
        )

    def chunk(self, meta: ResponseMeta, item: ChoiceOutput, text: str) -> BaseModel:
        out = item.output
        stream = self._calls.setdefault(item.choice, CallStream(self._tools))
        first_call = stream.num_calls
        content, calls = stream.feed(text, out.finished)
        delta_calls = [
            DeltaToolCall(index=first_call + i, id=c.id, function=_function(c))
            for i, c in enumerate(calls)
        ]
        choice = ChatChunkChoice(
            index=item.choice,
            delta=Delta(
                content=content or None if delta_calls else content, tool_calls=delta_calls or None
            ),
            logprobs=self._logprobs(out.logprobs),
            finish_reason=_with_calls(_finish_reason(out), stream.num_calls),
        )
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=[choice]
        )

    def usage_chunk(self, meta: ResponseMeta, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage
        )

    def response(self, meta: ResponseMeta, choices: list[Completion], usage: Usage) -> BaseModel:
        return ChatCompletionResponse(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[self._choice(c) for c in choices],
            usage=usage,
        )

    def _choice(self, completion: Completion) -> ChatChoice:
        content, calls = parse_calls(completion.text, self._tools)
        message = AssistantMessage(
            content=content,
            tool_calls=[ToolCall(id=c.id, function=_function(c)) for c in calls] or None,
        )
        return ChatChoice(
            index=completion.index,
            message=message,
            logprobs=self._logprobs(completion.logprobs),
            finish_reason=_with_calls(completion.finish_reason, len(calls)),
        )

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **self._describe(lp.token_id, lp.logprob),
                    top_logprobs=[TopLogprob(**self._describe(t, v)) for t, v in lp.top],
                )
                for lp in logprobs
            ]
        )

    def _describe(self, token_id: int, logprob: float) -> dict[str, object]:
        # `bytes` are exact where the token holds part of a character and `token` shows U+FFFD.
        token_bytes = list(self.tokenizer.token_bytes(token_id))
        return {
            "token": self.tokenizer.id_to_token(token_id),
            "logprob": logprob,
            "bytes": token_bytes,
        }


class UsageCounter:
    def __init__(self, meta: ResponseMeta) -> None:
        self._prompt_tokens = sum(meta.prompt_lengths)  # once per prompt, however many samples
        self._completion_tokens = 0
        self._cached_tokens: dict[int, int] = {}  # per prompt, as its first sample found it

    def add(self, item: ChoiceOutput, counts_completion: bool = True) -> None:
        if counts_completion:
            self._completion_tokens += len(item.output.new_token_ids)
        if item.output.index == 0:
            self._cached_tokens[item.prompt] = item.output.num_cached_tokens

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            total_tokens=self._prompt_tokens + self._completion_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(self._cached_tokens.values())
            ),
        )


async def stream_events(
    generation: Generation, fmt: ChoiceFormat, meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: a `data:` line per chunk, then `data: [DONE]`."""
    usage = UsageCounter(meta)
    started: set[int] = set()
    if (opening := fmt.opening_chunk(meta)) is not None:
        yield _event(opening)
    try:
        async for item in generation:
            usage.add(item, fmt.counts_completion)
            text = item.output.new_text
            if item.choice not in started:
                started.add(item.choice)
                text = fmt.prefix(meta, item.choice) + text
            if text or item.output.finished or item.output.logprobs:
                yield _event(fmt.chunk(meta, item, text))
        if include_usage:
            yield _event(fmt.usage_chunk(meta, usage.usage()))
    except Exception as exc:  # the response has started: the error can only go in the stream
        error = as_api_error(exc)
        if error is not exc and error.status >= 500:  # a failure, not a refusal to pass on
            logger.error("streaming %s failed", meta.id, exc_info=exc)
        yield _event(error_body(error.status, error.message, error.param, error.code))
    yield "data: [DONE]\n\n"


async def collect(generation: Generation, fmt: ChoiceFormat, meta: ResponseMeta) -> BaseModel:
    """The whole response, once every choice has finished."""
    usage = UsageCounter(meta)
    choices = [Completion(index, fmt.prefix(meta, index)) for index in range(meta.num_choices)]
    kv_transfer_params = None
    async for item in generation:
        usage.add(item, fmt.counts_completion)
        choices[item.choice].add(item.output)
        kv_transfer_params = item.output.kv_transfer_params or kv_transfer_params
    response = fmt.response(meta, choices, usage.usage())
    if kv_transfer_params is not None:
        response.kv_transfer_params = kv_transfer_params
    return response


def _function(call: ParsedCall) -> FunctionCall:
    return FunctionCall(name=call.name, arguments=call.arguments)


def _with_calls(finish_reason: str | None, num_calls: int) -> str | None:
    """A choice that stopped after calling tools finished with `tool_calls`, as at OpenAI."""
    return "tool_calls" if finish_reason == "stop" and num_calls else finish_reason


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finished else None


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
