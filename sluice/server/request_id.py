"""Every response carries an `x-request-id` header (the openai client's `_request_id`): the one
the client sent, or a fresh one. Set before any handler runs, so errors and streams carry it too."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_HEADER = b"x-request-id"
_MAX_CLIENT_ID_BYTES = 128  # a longer id from the client is replaced, not echoed


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_id(scope) or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (_HEADER, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _client_id(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == _HEADER and 0 < len(value) <= _MAX_CLIENT_ID_BYTES and value.isascii():
            return value
    return None
