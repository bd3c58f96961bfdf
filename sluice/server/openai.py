"""The OpenAI-compatible HTTP API: `create_app(engine, settings)` builds the FastAPI app.

Generation runs in the AsyncEngine's thread and tokenization in worker threads; the event loop
only validates requests and moves tokens, so requests that arrive together are batched by the
engine's scheduler and a big prompt never stalls the others.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sluice import __version__
from sluice.api import chat_prompt_ids
from sluice.disagg.params import TransferRequest
from sluice.engine.async_engine import AsyncEngine
from sluice.loaders.chat_template import DEFAULT_CHAT_TEMPLATE
from sluice.loaders.model_path import DEFAULT_MODEL
from sluice.sampling_params import CONTEXT_LENGTH_EXCEEDED, InvalidParameterError, SamplingParams
from sluice.server import disagg
from sluice.server.body_limit import BodyLimitMiddleware
from sluice.server.errors import APIError, install_error_handlers
from sluice.server.generation import Generation, GenerationQueue
from sluice.server.limits import DEFAULT_MAX_SEQUENCES_PER_REQUEST, default_max_body_bytes
from sluice.server.metrics import ServerMetrics
from sluice.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerationRequest,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    VersionResponse,
)
from sluice.server.request_id import RequestIdMiddleware
from sluice.server.responses import (
    ChatFormat,
    ChoiceFormat,
    CompletionFormat,
    Echo,
    ResponseMeta,
    collect,
    stream_events,
)
from sluice.server.tools import (
    function_names,
    messages_without_tool_support,
    template_takes_tools,
)

SHUTTING_DOWN = APIError(503, "the server is shutting down", code="server_shutting_down")


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None  # None: no authentication
    max_queue: int | None = None  # None: no bound on sequences waiting for the engine
    max_sequences_per_request: int = DEFAULT_MAX_SEQUENCES_PER_REQUEST
    max_body_bytes: int | None = None  # None: default_max_body_bytes(max_model_len)
    # Whether /metrics, /version and the API docs need the key too (/health never does).
    auth_all_endpoints: bool = False
    # Whether special-token text inside chat message content becomes control tokens.
    allow_special_tokens_in_content: bool = False


def served_model_name(model: str | None) -> str:
    """The name clients use: the alias as given, or the .gguf file's stem, or the folder's name."""
    path = Path(model or DEFAULT_MODEL)
    return path.stem if path.suffix == ".gguf" else path.name


class OpenAIServer:
    """What the routes share: the engine, the settings, metrics and the admission queue."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.metrics = ServerMetrics(engine.engine)
        self.generations = GenerationQueue(
            engine, self.metrics, settings.max_queue, settings.max_sequences_per_request
        )
        self.max_body_bytes = settings.max_body_bytes or default_max_body_bytes(self.max_model_len)
        # Text longer than this cannot fit the context window (computed once, here, not on the loop).
        self.max_prompt_chars = self.tokenizer.max_chars(self.max_model_len)
        self.started = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise APIError(
                404,
                f"the model `{model}` does not exist; this server serves `{self.settings.model_name}`",
                param="model",
                code="model_not_found",
            )

    def check_generation_request(self, body: GenerationRequest) -> None:
        self.check_model(body.model)
        if unsupported := body.unsupported():
            param, why = unsupported[0]
            raise APIError(
                400, f"`{param}` is not supported: {why}", param=param, code="unsupported_parameter"
            )
        if body.stream_options is not None and not body.stream:
            raise InvalidParameterError(
                "stream_options", "stream_options is only allowed with stream: true"
            )

    async def encode(self, prompts: list[str | list[int]], param: str) -> list[list[int]]:
        """Token ids of prompts that fit the context, tokenized off the event loop; errors name
        `param`. What is plainly too long is refused before any tokenizing."""
        with _named(param):
            for prompt in prompts:
                self.check_length(prompt)
            return await asyncio.to_thread(
                lambda: [self.engine.engine.encode_prompt(prompt) for prompt in prompts]
            )

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """/tokenize's ids: bounded and off the event loop as a prompt's are."""
        self.check_length(text)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def render_chat(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The chat prompt's token ids, rendered and tokenized off the event loop. A template
        that knows no tools gets them (and past calls and results) written as text."""
        conversation = [message.for_template() for message in messages]
        if not template_takes_tools(self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE):
            conversation, tools = messages_without_tool_support(conversation, tools), None
        with _named("messages"):
            self.check_length(sum(message.num_chars for message in messages))
            try:
                return await asyncio.to_thread(
                    chat_prompt_ids,
                    self.tokenizer,
                    conversation,
                    allow_special_tokens_in_content=self.settings.allow_special_tokens_in_content,
                    tools=tools,
                )
            except InvalidParameterError:  # already names its field
                raise
            except ValueError as exc:  # the model's chat template refused the conversation
                raise InvalidParameterError("messages", str(exc)) from exc

    def check_length(self, prompt: str | list[int] | int) -> None:
        """Refuse a prompt (text, token ids, or a count of characters) that cannot fit the
        context window, from its length alone: before any per-token work."""
        if isinstance(prompt, list):
            if len(prompt) >= self.max_model_len:
                raise InvalidParameterError(
                    "prompt",
                    f"prompt has {len(prompt)} tokens but the context window is "
                    f"{self.max_model_len} tokens (at least one must be left to generate)",
                    code=CONTEXT_LENGTH_EXCEEDED,
                )
            return
        num_chars = prompt if isinstance(prompt, int) else len(prompt)
        if num_chars > self.max_prompt_chars:
            raise InvalidParameterError(
                "prompt",
                f"prompt has {num_chars} characters, more than the context window of "
                f"{self.max_model_len} tokens can hold (at most {self.max_prompt_chars}: no "
                f"token of this model stands for more than "
                f"{self.max_prompt_chars // self.max_model_len} characters)",
                code=CONTEXT_LENGTH_EXCEEDED,
            )

    async def shut_down_after(self, grace: float) -> None:
        """At the end of the grace period, end whatever still generates: each stream gets an
        error event and `[DONE]`, each waiting request a 503. New requests get a 503 at once."""
        await asyncio.sleep(grace)
        self.generations.close(SHUTTING_DOWN)

    def max_tokens(
        self, limit: int | None, explicit: bool, prompts: list[list[int]], param: str
    ) -> int:
        """None: as many as the context holds. An explicit limit that does not fit is an error,
        as at OpenAI; a default one shrinks to fit."""
        longest = max(len(prompt) for prompt in prompts)
        room = self.max_model_len - longest
        if limit is None or (limit > room and not explicit):
            return room
        if limit > room:
            raise InvalidParameterError(
                param,
                f"{param} is {limit}, but the prompt has {longest} tokens and the context window "
                f"is {self.max_model_len} tokens, which leaves room for {room}",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        return limit

    async def respond(
        self,
        request: Request,
        body: GenerationRequest,
        id_prefix: str,
        prompts: list[list[int]],
        params: SamplingParams,
        fmt: ChoiceFormat,
        transfer: TransferRequest | None = None,
    ) -> Response:
        """Start generating; answer with a stream of events or, once done, the whole response."""
        meta = ResponseMeta(
            f"{id_prefix}-{uuid.uuid4().hex}",
            self.settings.model_name,
            [len(p) for p in prompts],
            params.n,
        )
        engine = self.engine.engine
        requests = [engine.make_request(prompt, params, transfer=transfer) for prompt in prompts]
        generation = self.generations.start(meta.id, requests)
        if body.stream:
            events = stream_events(generation, fmt, meta, body.include_usage)
            return StreamingResponse(
                _watched(request, generation, events), media_type="text/event-stream"
            )
        async with _cancel_on_disconnect(request, generation):
            result = await collect(generation, fmt, meta)
        return JSONResponse(result.model_dump(mode="json"))


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    server = OpenAIServer(engine, settings)
    # The docs routes are ours (docs_routes), so that they can be put behind the key.
    app = FastAPI(
        title="sluice",
        version=__version__,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=server.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: the body limit's 413 gets an id too
    protected = [Depends(_check_api_key)] if settings.auth_all_endpoints else []
    app.include_router(health_routes)
    app.include_router(open_routes, dependencies=protected)
    app.include_router(docs_routes, dependencies=protected)
    app.include_router(api_routes)
    app.include_router(disagg.routes, dependencies=protected)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # uvicorn gets here after in-flight responses have finished, or were ended by
    # `shut_down_after`; abort whatever the engine still runs, then stop its thread.
    server: OpenAIServer = app.state.server
    server.generations.close(SHUTTING_DOWN)
    await asyncio.to_thread(server.engine.shutdown)


async def _watched(
    request: Request, generation: Generation, events: AsyncIterator[str]
) -> AsyncIterator[str]:
    async with _cancel_on_disconnect(request, generation):
        async for event in events:
            yield event


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, generation: Generation) -> AsyncIterator[None]:
    """Free the engine's pages as soon as the client hangs up, even while it waits in the queue
    or before anything could be sent to it (which is when a failed write would tell us)."""
    watcher = asyncio.create_task(_cancel_when_disconnected(request, generation))
    try:
        yield
    finally:
        watcher.cancel()


async def _cancel_when_disconnected(request: Request, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


@contextmanager
def _named(param: str) -> Iterator[None]:
    """Errors about the prompt are about the request field it came in (`prompt`, `messages`)."""
    try:
        yield
    except InvalidParameterError as exc:
        if exc.param != "prompt" or param == "prompt":
            raise
        raise InvalidParameterError(param, str(exc), exc.code) from exc


@contextmanager
def _named_as(aliases: dict[str, str]) -> Iterator[None]:
    """SamplingParams calls some settings otherwise than the API does; errors use the API's names."""
    try:
        yield
    except InvalidParameterError as exc:
        param = aliases.get(exc.param, exc.param)
        message = str(exc).replace(exc.param, param, 1)
        raise InvalidParameterError(param, message, exc.code) from exc


# ---- routes ------------------------------------------------------------------------------------


def _server(request: Request) -> OpenAIServer:
    return request.app.state.server


Server = Annotated[OpenAIServer, Depends(_server)]

_bearer = HTTPBearer(auto_error=False, description="The key given to `sluice serve --api-key`.")


async def _check_api_key(
    server: Server, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    expected = server.settings.api_key
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise APIError(
            401,
            "missing or wrong API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}
_STREAMED = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream` SSE chunks"}
}

health_routes = APIRouter(responses={503: {"model": ErrorResponse}})
# Open unless `auth_all_endpoints`.
open_routes = APIRouter(responses={401: {"model": ErrorResponse}})
docs_routes = APIRouter(include_in_schema=False)
api_routes = APIRouter(dependencies=[Depends(_check_api_key)], responses=_ERRORS)


@health_routes.get("/health")
async def health(server: Server) -> HealthResponse:
    if not server.engine.is_alive:
        raise APIError(503, "the engine has stopped", code="engine_dead")
    return HealthResponse()


@open_routes.get("/metrics", response_class=Response)
async def metrics(server: Server) -> Response:
    content, content_type = server.metrics.exposition()
    return Response(content, media_type=content_type)


@open_routes.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@docs_routes.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@docs_routes.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="sluice API")


@docs_routes.get("/redoc")
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="sluice API")


@api_routes.get("/v1/models")
async def list_models(server: Server) -> ModelList:
    return ModelList(data=[await retrieve_model(server.settings.model_name, server)])


@api_routes.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, server: Server) -> ModelCard:
    server.check_model(model_id)
    return ModelCard(id=model_id, created=server.started, max_model_len=server.max_model_len)


@api_routes.post("/v1/completions", response_model=CompletionResponse, responses=_STREAMED)
async def create_completion(body: CompletionRequest, request: Request, server: Server) -> Response:
    server.check_generation_request(body)
    raw_prompts = body.prompts()
    server.generations.check_size(len(raw_prompts), body.n)
    prompts = await server.encode(raw_prompts, "prompt")
    explicit = body.was_given("max_tokens")
    # max_tokens 0 (the prompt's logprobs only) samples one token, which is left out.
    generated = not (body.echo and explicit and body.max_tokens == 0)
    limit = body.max_tokens if generated else 1
    max_tokens = server.max_tokens(limit, explicit, prompts, "max_tokens")
    params = body.sampling_params(max_tokens, body.logprobs)
    params.prompt_logprobs = body.num_prompt_logprobs  # checked with the rest: make_request
    echo = (
        Echo([_prompt_text(server, p) for p in raw_prompts], prompts, generated)
        if body.echo
        else None
    )
    fmt = CompletionFormat(
        server.tokenizer, body.logprobs is not None, echo, body.prompt_logprobs is not None
    )
    transfer = await disagg.read_transfer(server, body)
    return await server.respond(request, body, "cmpl", prompts, params, fmt, transfer)


def _prompt_text(server: OpenAIServer, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else server.tokenizer.decode(prompt)


@api_routes.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAMED)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, server: Server
) -> Response:
    server.check_generation_request(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameterError("top_logprobs", "top_logprobs needs logprobs: true")
    server.generations.check_size(1, body.n)
    tools = body.tool_choice_mode
    rendered = await server.render_chat(body.messages, body.tools if tools.mode != "none" else None)
    (prompt,) = await server.encode([rendered], "messages")
    max_tokens = server.max_tokens(body.requested_max_tokens, True, [prompt], body.max_tokens_param)
    with _named_as({"max_tokens": body.max_tokens_param, "logprobs": "top_logprobs"}):
        params = body.sampling_params(max_tokens, body.num_logprobs)
    fmt = ChatFormat(server.tokenizer, body.logprobs, tools)
    transfer = await disagg.read_transfer(server, body)
    return await server.respond(request, body, "chatcmpl", [prompt], params, fmt, transfer)


@api_routes.post("/tokenize")
async def tokenize(body: TokenizeRequest, server: Server) -> TokenizeResponse:
    """Token ids of a `prompt`, or of chat `messages` as /v1/chat/completions would prompt them."""
    server.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidParameterError("prompt", "give either `prompt` or `messages`")
    if body.messages is not None:
        function_names(body.tools)  # checked as a chat request's are
        tokens = await server.render_chat(body.messages, body.tools)
    else:
        tokens = await server.tokenize(body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=server.max_model_len, tokens=tokens)


@api_routes.get("/tokenizer_info")
async def tokenizer_info(server: Server) -> TokenizerInfoResponse:
    """The tokenizer's special tokens and chat template, as vLLM's endpoint gives them: what
    lm-evaluation-harness's `remote` tokenizer reads, beside /tokenize and /detokenize."""
    names = server.tokenizer.special_token_names()
    return TokenizerInfoResponse(
        eos_token=names.get("eos_token"),
        bos_token=names.get("bos_token"),
        pad_token=names.get("pad_token"),
        chat_template=server.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,
        model_max_length=server.max_model_len,
    )


@api_routes.post("/detokenize")
async def detokenize(body: DetokenizeRequest, server: Server) -> DetokenizeResponse:
    server.check_model(body.model)
    vocab_size = server.tokenizer.vocab_size
    if any(not 0 <= token < vocab_size for token in body.tokens):
        raise InvalidParameterError("tokens", f"token ids must be in [0, {vocab_size})")
    return DetokenizeResponse(prompt=server.tokenizer.decode(body.tokens))
