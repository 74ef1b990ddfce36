"""Error answers in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, for both HTTP
servers: the worker's (backends/engines/server.py) and the orchestrator's, whose orchestrator/errors.py
adds its own APIError and the documented schema on top. Here because the worker side never imports
the orchestrator."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorJSONResponse(JSONResponse):
    """ASCII JSON: an error may quote the client's input, which can hold what UTF-8 cannot encode
    (a lone surrogate such as "\\ud800")."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return ErrorJSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Validation errors, HTTP errors and bugs answered in the OpenAI shape."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", code="invalid_json")
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        # exc.headers carries what the status needs (Allow on a 405).
        return error_response(exc.status_code, str(exc.detail), type_, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug: the client gets a JSON 500 in the OpenAI shape (not text/plain), without internals;
        # Starlette re-raises it after this answer, so the server still logs the traceback.
        return error_response(500, "internal server error", "server_error", code="internal_error")
