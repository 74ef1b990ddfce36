"""A request-body size limit as plain ASGI middleware: 413 in the OpenAI error shape, decided from
Content-Length before anything is parsed, or as soon as a chunked body passes the limit (so a 4 MB
prompt is refused without being buffered or parsed)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large_body(limit: int) -> bytes:
    return json.dumps({"error": {"message": f"request body exceeds {limit} bytes", "type": "invalid_request_error",
                                 "param": None, "code": "request_too_large"}}).encode()


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    if declared <= _DRAIN_FACTOR * self.max_bytes:
                        await _drain(receive)  # read and drop: the client then reads its 413, not a reset
                    await self._refuse(send, keep_alive=declared <= _DRAIN_FACTOR * self.max_bytes)
                    return
                break
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # The app's HTTPException handler answers it (OpenAI shape); FastAPI lets an
                    # HTTPException raised while reading the body through as it is.
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, keep_alive: bool) -> None:
        body = _too_large_body(self.max_bytes)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if not keep_alive:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# A declared body up to this many times the limit is read and dropped before the 413 (nothing is
# kept); past it the connection is closed at once rather than spend the bandwidth.
_DRAIN_FACTOR = 8


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
