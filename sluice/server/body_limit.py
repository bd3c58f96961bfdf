"""A bound on the size of request bodies, enforced before the app parses any of them.

Without it a client could make the server hold, parse and validate any amount of JSON on its event
loop. The body is read here in the chunks the connection delivers; a request whose Content-Length,
or whose bytes so far, pass the bound is answered 413 at once (in OpenAI's error shape) and
nothing more of it is read. A body within the bound is handed on as it arrived. (FastAPI's own
`max_body_size` answers a declared oversize body in plain text, whatever the app's handlers say.)
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.server.errors import APIError, error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":  # the client left: the app will see that too
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413,
            f"the request body is larger than this server's limit of {self.max_body_bytes} "
            "bytes (sluice serve --max-body-bytes)",
            code="request_too_large",
            # The rest of the body is never read, so the connection cannot be reused.
            headers={"Connection": "close"},
        )
        await error_response(error)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses a malformed length before the app sees it
    return None


def _replay(chunks: list[Message], receive: Receive) -> Receive:
    """The body as it was read, then whatever the connection says next (a disconnect)."""
    pending = iter(chunks)

    async def replayed() -> Message:
        return next(pending, None) or await receive()

    return replayed
