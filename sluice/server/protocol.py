"""The HTTP API's request and response bodies: OpenAI's shapes, plus vLLM's extra sampling fields.

Requests ignore fields they do not know, as OpenAI-compatible servers do. Fields they know but
whose feature sluice lacks are listed by `unsupported()`, so the server can refuse them rather
than silently return something other than what the client asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from sluice.sampling_params import InvalidParameterError, SamplingParams

# Where sampling settings reach torch as int64 without a range check of their own.
_INT64 = {"ge": -(2**63), "lt": 2**63}

FinishReasonName = Literal["stop", "length", "abort"]


def _prompt_form(value: Any) -> str | None:
    """Which form of prompt `value` is, from its first element: validating it against that form
    only, not every form in turn, keeps a huge wrong list from costing a validation error per
    element per form, all on the event loop."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    return {str: "list[str]", list: "list[list[int]]"}.get(type(first), "list[int]")


# Tags named as pydantic names union members, which error locations leave out (errors.py).
Prompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Tag("list[str]")]
    | Annotated[list[int], Tag("list[int]")]
    | Annotated[list[list[int]], Tag("list[list[int]]")],
    Discriminator(
        _prompt_form,
        custom_error_type="prompt_type",
        custom_error_message="must be a string, a list of strings, a list of token ids or a "
        "list of lists of token ids",
    ),
]


class APIModel(BaseModel):
    # Strict, as OpenAI is: "16" is not a number and 1.5 not an integer. NaN and infinities are
    # refused too: the sampler would turn them into garbage rather than an error.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class RequestModel(APIModel):
    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Many clients send `"field": null` for what they leave unset.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


# ---- requests ----------------------------------------------------------------------------------


class StreamOptions(APIModel):
    include_usage: bool = False


class GenerationRequest(RequestModel):
    """What chat and completions requests share; top_k, min_p, repetition_penalty, ignore_eos and
    min_tokens are vLLM's."""

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(-1, **_INT64)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = Field(None, **_INT64)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, **_INT64)
    speculative: bool = True  # sluice's: False proposes no drafts for this request
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # Prefill/decode disaggregation, as vLLM's routers send it (see sluice.disagg.params).
    kv_transfer_params: dict[str, Any] | None = None
    # The same, as sglang-router sends it: P and D get one room number, D asks P for the params.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for each feature asked for that would change the result but that sluice lacks."""
        return [("logit_bias", "sluice has no logit biasing")] if self.logit_bias else []

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises InvalidParameterError, named as SamplingParams names it, for a value out of range."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            n=self.n,
            stop=self.stop or [],
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            speculative=self.speculative,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def was_given(self, field: str) -> bool:
        return field in self.model_fields_set


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    max_tokens: int = 16  # OpenAI's default; chat's is whatever room the context leaves
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token id list each."""
        if not self.prompt:
            raise InvalidParameterError("prompt", "prompt is empty")
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.suffix:
            found.append(("suffix", "sluice does not fill in the middle"))
        if self.best_of is not None and self.best_of > self.n:
            found.append(("best_of", "sluice returns every sample it draws; use n"))
        if self.echo and self.logprobs is not None:
            found.append(("echo", "sluice has no prompt logprobs to echo with logprobs"))
        return found


class ContentPart(APIModel):
    type: Literal["text"]
    text: str


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @property
    def num_chars(self) -> int:
        """Characters of content: the prompt rendered from this message holds at least these."""
        if isinstance(self.content, list):
            return sum(len(part.text) for part in self.content)
        return len(self.content or "")

    def for_template(self) -> dict[str, Any]:
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        return message


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.was_given("max_completion_tokens") else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.was_given("max_completion_tokens")
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: the chosen token's, plus `top_logprobs` alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        no_tools = "sluice does not call tools yet"
        if self.tools or self.functions:
            found.append(("tools" if self.tools else "functions", no_tools))
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            found.append(("tool_choice" if self.tool_choice else "function_call", no_tools))
        if self.response_format is not None and self.response_format.type != "text":
            found.append(
                (
                    "response_format",
                    "sluice has no grammar-constrained decoding yet, so it cannot promise JSON",
                )
            )
        return found


class TokenizeRequest(RequestModel):
    """Either a `prompt`, or chat `messages` tokenized as /v1/chat/completions would."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`; a chat template writes its own


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(APIModel):
    cached_tokens: int = 0


class Usage(APIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(APIModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(APIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None


def _omit_none(value: object) -> bool:
    return value is None


class CompletionResponse(APIModel):
    """A whole completion, or (with `stream`) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    # A prefill instance's answer to `do_remote_decode`: what the decode instance pulls.
    kv_transfer_params: dict[str, Any] | None = Field(None, exclude_if=_omit_none)


class TopLogprob(APIModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(APIModel):
    content: list[ChatTokenLogprob]
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(APIModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(APIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionResponse(APIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kv_transfer_params: dict[str, Any] | None = Field(None, exclude_if=_omit_none)


class Delta(APIModel):
    """The role comes in a choice's first chunk only, so absent fields are left out, not null."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)


class ChatChunkChoice(APIModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(APIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(APIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sluice"
    max_model_len: int


class ModelList(APIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(APIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(APIModel):
    prompt: str


class VersionResponse(APIModel):
    version: str


class HealthResponse(APIModel):
    status: Literal["ok"] = "ok"


class ErrorInfo(APIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(APIModel):
    error: ErrorInfo
