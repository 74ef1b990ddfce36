"""Errors in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}. The shape and the
generic handlers are backends/errors.py's (the worker's server answers in it too); here: APIError and
the published document."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from backends import errors as shape
from backends.errors import ErrorJSONResponse as ErrorJSONResponse
from backends.errors import error_body as error_body
from backends.errors import error_response as error_response


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        """This error as the API answers it (the exception handler's and the hot path's)."""
        return error_response(self.status, self.message, self.type, self.param, self.code, self.retry_after)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error this server answers, whatever its status (OpenAI's error shape)."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "Invalid request: a field is missing, malformed or unsupported (param names it)."},
    401: {"description": "Missing or wrong bearer token."},
    404: {"description": "No such model (code model_not_found)."},
    413: {"description": "The request body is too large."},
    500: {"description": "An internal error."},
    502: {"description": "The engine failed the request before producing anything."},
    503: {"description": "No capacity now, or the request failed mid-way with nowhere to continue it: retry later.",
          "headers": _RETRY_AFTER},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for a route's error statuses, in the OpenAI error shape."""
    return {status: {"model": ErrorResponse, **_ERRORS[status]} for status in statuses}


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def _error_doc(status: int) -> dict[str, Any]:
    return {**_ERRORS[status], "content": _ERROR_CONTENT}


def _document_errors(schema: dict[str, Any]) -> None:
    """Make the generated document say what the handlers do: a validation error is a 400 in the
    OpenAI shape (FastAPI documents a 422 HTTPValidationError), the admin API takes a bearer token,
    and any operation may answer 413 (body limit, for a body) or 500 in the same shape."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    defs = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(defs.pop("$defs", {}))
    schemas["ErrorResponse"] = defs
    paths: dict[str, Any] = schema.get("paths", {})
    _hoist_defs(paths, schemas)
    for path, operations in paths.items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error_doc(400))
            if method in ("post", "put", "patch"):
                responses.setdefault("413", _error_doc(413))
            responses.setdefault("500", _error_doc(500))
            if path.startswith("/admin/"):
                op["security"] = [{"bearerAuth": []}]
                responses.setdefault("401", _error_doc(401))
                # The admin API answers more statuses (404, 409, 429, 502, ...), all in this shape.
                responses.setdefault("default", {"description": "An error.", "content": _ERROR_CONTENT})
    if any(path.startswith("/admin/") for path in paths):
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http", "scheme": "bearer", "description": "The admin token (TETRI_ADMIN_TOKEN)."}
    # /metrics is Prometheus text, not JSON.
    metrics = paths.get("/metrics", {}).get("get", {}).get("responses", {}).get("200")
    if metrics is not None:
        metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
    for name in ("HTTPValidationError", "ValidationError"):  # the first refers to the second
        if f"#/components/schemas/{name}" not in json.dumps(schema):
            schemas.pop(name, None)


def _hoist_defs(node: Any, schemas: dict[str, Any]) -> None:
    """Move the `$defs` of model schemas written into `responses=` (FastAPI leaves them in place)
    to the components their `#/components/schemas/...` references point at."""
    if isinstance(node, dict):
        for name, definition in node.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        for value in node.values():
            _hoist_defs(value, schemas)
    elif isinstance(node, list):
        for value in node:
            _hoist_defs(value, schemas)


def install_openapi(app: FastAPI) -> None:
    """Serve the document with `_document_errors` applied (once: FastAPI caches it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_errors(generate())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    install_openapi(app)
    shape.install_error_handlers(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

