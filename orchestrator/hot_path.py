"""The two completion routes without FastAPI's per-request machinery (routing, dependency solving,
its whole middleware stack, whose error, telemetry and body-limit layers each wrap every send):
CPU the router's path spends per request under load (docs/benchmarks.md). The same handlers run,
on the same validated models.

Only a request that is plainly well-formed takes this path: POST, a JSON content type, a declared
length within the body limit, a valid API key where keys are set, a body the route's model
accepts. Anything else goes, its body replayed, to the FastAPI app, whose answers (400, 401, 413,
the OpenAPI document) stay the one definition of what bad input gets.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.auth import bearer_matches
from orchestrator.errors import APIError, error_response

log = logging.getLogger("tetri.api")
Handler = Callable[[Any, Request], Awaitable[Response | dict[str, Any]]]


@dataclass(frozen=True)
class HotRoute:
    model: type[BaseModel]
    handler: Handler


class HotPath:
    """ASGI middleware: serves `routes` (path -> HotRoute) directly, the rest through `app`."""

    def __init__(self, app: ASGIApp, routes: dict[str, HotRoute], max_body_bytes: int,
                 api_keys: Sequence[str] = ()) -> None:
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.keys = [key.encode("utf-8") for key in api_keys if key]
        self.served = 0  # requests answered here (the tests check the path is taken)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or not self._plain(scope["headers"]):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was in: no one to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            data = _loads(raw)
            body = route.model.model_validate(data) if isinstance(data, dict) else None
        except Exception:  # noqa: BLE001 - FastAPI's route answers each of these in its own way
            body = None
        if body is None:
            await self.app(scope, _replay(raw, receive), send)
            return
        self.served += 1
        try:
            result = await route.handler(body, Request(scope, receive))
        except APIError as exc:
            result = exc.response()
        except Exception:  # a bug: the same JSON 500 the app's handler gives, and the traceback logged
            log.exception("%s failed", scope["path"])
            result = error_response(500, "internal server error", "server_error", code="internal_error")
        response = result if isinstance(result, Response) else JSONResponse(result)
        await response(scope, receive, send)

    def _plain(self, headers: list[tuple[bytes, bytes]]) -> bool:
        length = kind = auth = None
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                kind = value
            elif name == b"authorization":
                auth = value
        if length is None or not length.isdigit() or int(length) > self.max_body_bytes:
            return False
        if kind is None or kind.split(b";", 1)[0].strip().lower() != b"application/json":
            return False
        return not self.keys or (auth is not None and bearer_matches(auth.decode("latin-1"), self.keys))


_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def _loads(raw: bytes) -> Any:
    """The body as FastAPI parses it (json.loads), by orjson where the two agree. orjson refuses
    NaN, lone surrogates and invalid UTF-8 (json.loads then decides) and reads integers past 64
    bits as floats: a body with a 19-digit run goes to json.loads."""
    if _LONG_NUMBER.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that gives `body` first, then whatever `receive` gives."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class HotPathApp(FastAPI):
    """FastAPI whose middleware stack has a HotPath outermost (`hot_path(stack)`), when one is set."""

    hot_path: Callable[[ASGIApp], HotPath] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.hot_path is None else self.hot_path(stack)
