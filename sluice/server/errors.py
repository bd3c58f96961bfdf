"""Every failure leaves the server in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

FastAPI's own errors (a 422 listing pydantic's findings, `{"detail": ...}` for a 404) are turned
into that shape too, so a client needs to read only one kind of error.
"""

from __future__ import annotations

import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sluice.disagg.decode import TransferFailedError
from sluice.engine.async_engine import EngineDeadError, EngineStepError
from sluice.sampling_params import InvalidParameterError
from sluice.server.protocol import ErrorInfo, ErrorResponse

# pydantic names the union member each of its errors is about ("str", "list[int]"); clients know
# the field they sent, not our types.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool)$|\[")


class APIError(Exception):
    """A failure to report to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code))


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.status, error.message, error.param, error.code)
    return _ASCIIJSONResponse(
        body.model_dump(mode="json"), status_code=error.status, headers=error.headers
    )


class _ASCIIJSONResponse(JSONResponse):
    """Messages may quote what the client sent, lone surrogates included, which UTF-8 cannot
    carry: JSON's `\\u` escapes can."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def as_api_error(exc: Exception) -> APIError:
    """What a failure tells the client; an unexpected one says no more than its type."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameterError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), code="engine_step_failed")
    if isinstance(exc, TransferFailedError):  # P gone or too slow: a retry may well succeed
        return APIError(503, str(exc), code="kv_transfer_failed")
    return APIError(500, f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (APIError, InvalidParameterError, EngineDeadError, Exception):
        app.add_exception_handler(exc_type, _failure)
    app.add_exception_handler(RequestValidationError, _validation_failure)
    app.add_exception_handler(StarletteHTTPException, _http_failure)


async def _failure(request: Request, exc: Exception) -> JSONResponse:
    return error_response(as_api_error(exc))


async def _http_failure(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes, wrong methods, unparsable bodies: Starlette's errors, OpenAI's shape.
    message = str(exc.detail)
    if exc.status_code == 404:  # /v1/embeddings, /v1/responses, ...: say so, not "Not Found"
        message = f"{request.method} {request.url.path} is not supported by sluice"
    return error_response(APIError(exc.status_code, message, headers=exc.headers))


async def _validation_failure(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the offending field, never FastAPI's 422 dump of pydantic's findings."""
    errors = exc.errors()
    # A value matching no member of a union gets one error per member: the deepest one comes
    # from the member that matched longest, the one the client most likely meant.
    error = max(errors, key=lambda e: len(e["loc"]))
    if error["type"] == "json_invalid":
        message = (
            f"the body is not valid JSON: {error['ctx']['error']} at character {error['loc'][-1]}"
        )
        return error_response(APIError(400, message, code="invalid_json"))
    param = _field_path(error["loc"])
    return error_response(
        APIError(400, f"{param or 'the body'}: {error['msg']}", param=param or None)
    )


def _field_path(loc: tuple[str | int, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_MEMBER.search(part):
            path += f".{part}" if path else part
    return path
