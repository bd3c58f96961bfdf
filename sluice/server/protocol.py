"""The HTTP API's request and response bodies: OpenAI's shapes, plus vLLM's extra sampling fields.

Requests ignore fields they do not know, as OpenAI-compatible servers do. Fields they know but
whose feature sluice lacks are listed by `unsupported()`, so the server can refuse them rather
than silently return something other than what the client asked for.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from sluice.sampling_params import InvalidParameterError, SamplingParams
from sluice.server.tools import ToolChoice, tool_choice
from sluice.server.tools import constraint as tool_constraint
from sluice.structured.spec import StructuredOutput

# Where sampling settings reach torch as int64 without a range check of their own.
_INT64 = {"ge": -(2**63), "lt": 2**63}

FinishReasonName = Literal["stop", "length", "abort", "tool_calls"]


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


def _omit_none(value: object) -> bool:
    return value is None


class StreamOptions(APIModel):
    include_usage: bool = False


class StructuredOutputs(APIModel):
    """vLLM's `structured_outputs`: exactly one constraint on the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


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
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' fields.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for each feature asked for that would change the result but that sluice lacks."""
        return []

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint asked for (InvalidParameterError if several are)."""
        found = [
            *_constraints(self.structured_outputs, "structured_outputs"),
            *_constraints(self, "guided", "guided_"),
        ]
        if len(found) > 1:
            names = ", ".join(spec.param for spec in found)
            raise InvalidParameterError(found[1].param, f"give one output constraint, got {names}")
        return found[0] if found else None

    def token_biases(self) -> dict[int, float]:
        """logit_bias with its keys (token ids as JSON strings, as OpenAI takes them) as ints."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidParameterError(
                    "logit_bias", f"logit_bias keys must be token ids, got {key!r}"
                )
            biases[int(key)] = bias
        return biases

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
            logit_bias=self.token_biases(),
            structured=self.structured_output(),
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
    prompt_logprobs: int | None = None  # vLLM's
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
        return found

    @property
    def num_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: what echo with logprobs, or vLLM's field, wants."""
        echoed = self.logprobs if self.echo else None
        wanted = [n for n in (echoed, self.prompt_logprobs) if n is not None]
        return max(wanted) if wanted else None


class ContentPart(APIModel):
    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(
                f"content parts of type {self.type!r} are not supported: sluice serves text "
                "models, send parts of type 'text'"
            )
        return self


class FunctionCall(APIModel):
    name: str
    arguments: str


class ToolCall(APIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's past calls
    tool_call_id: str | None = None  # which call a `tool` message answers

    @property
    def num_chars(self) -> int:
        """Characters of content: the prompt rendered from this message holds at least these."""
        calls = sum(len(c.function.arguments) for c in self.tool_calls or [])
        if isinstance(self.content, list):
            return calls + sum(len(part.text) for part in self.content)
        return calls + len(self.content or "")

    def for_template(self) -> dict[str, Any]:
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        return message


class JSONSchemaFormat(APIModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput("json_object", param="response_format")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidParameterError(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a `json_schema`",
                )
            schema = json.dumps(self.json_schema.schema_)
            return StructuredOutput("json_schema", schema, "response_format.json_schema")
        return None


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
        deprecated = "sluice takes OpenAI's newer `tools` and `tool_choice`"
        if self.functions:
            found.append(("functions", deprecated))
        if self.function_call not in (None, "none"):
            found.append(("function_call", deprecated))
        return found

    @property
    def tool_choice_mode(self) -> ToolChoice:
        return tool_choice(self.tool_choice, self.tools)

    def structured_output(self) -> StructuredOutput | None:
        if (for_tools := tool_constraint(self.tool_choice_mode, self.tools)) is not None:
            if self.response_format is not None and self.response_format.type != "text":
                raise InvalidParameterError(
                    "response_format", "response_format cannot go with a required tool call"
                )
            return for_tools
        extension = super().structured_output()
        if (
            self.response_format is None
            or (wanted := self.response_format.structured_output()) is None
        ):
            return extension
        if extension is not None:
            raise InvalidParameterError(
                extension.param, f"give either response_format or {extension.param}, not both"
            )
        return wanted


def _constraints(source: object, param: str, prefix: str = "") -> list[StructuredOutput]:
    """The constraints set on `source` (`structured_outputs`, or a request's `guided_*`)."""
    if source is None:
        return []
    found = []
    for field, kind in (
        ("json", "json_schema"),
        ("regex", "regex"),
        ("choice", "choice"),
        ("grammar", "grammar"),
    ):
        value = getattr(source, prefix + field if prefix or field != "json" else "json_", None)
        if value is None:
            continue
        name = f"{param}_{field}" if prefix else f"{param}.{field}"
        if kind == "choice" and not value:
            raise InvalidParameterError(name, f"{name} must list at least one choice")
        text = value if isinstance(value, str) and kind != "choice" else json.dumps(value)
        found.append(StructuredOutput(kind, text, name))
    if getattr(source, "json_object", None):
        found.append(StructuredOutput("json_object", param=f"{param}.json_object"))
    return found


class TokenizeRequest(RequestModel):
    """Either a `prompt`, or chat `messages` tokenized as /v1/chat/completions would."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None  # offered with `messages`, as in a chat request
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
    """An echoed prompt's first token has null logprobs: nothing comes before it."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(APIModel):
    logprob: float
    decoded_token: str


class CompletionChoice(APIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None
    # vLLM's: per prompt token, its own and the top alternatives' logprobs (null for the first).
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, exclude_if=_omit_none
    )


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
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: v is None)


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


class DeltaToolCall(APIModel):
    """A streamed call: sent whole, in one delta (the name and all of the arguments)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Delta(APIModel):
    """The role comes in a choice's first chunk only, so absent fields are left out, not null."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_omit_none)


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


class TokenizerInfoResponse(APIModel):
    tokenizer_class: str = "sluice"
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str
    model_max_length: int


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
