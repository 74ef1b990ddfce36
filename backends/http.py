"""HTTP plumbing the engine adapters share (SGLang, TensorRT-LLM and tetri's own workers).

One pooled `httpx.AsyncClient` per instance (`HTTPBackend`), the `/health` probe, reading an
engine's error body, mapping an HTTP error status to `BackendError`, and parsing SSE streams.
What each adapter sends stays in the adapter: this module only owns the transport.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from backends.base import Backend, BackendError, Role

log = logging.getLogger("tetri.backends.http")

# GPU engines: a long generation may stream for many minutes, so reads wait long.
ENGINE_TIMEOUT = httpx.Timeout(connect=5.0, read=900.0, write=60.0, pool=30.0)


def engine_timeout(read_s: float | None = None) -> httpx.Timeout:
    """`ENGINE_TIMEOUT`, with the read timeout replaced when an instance sets `timeout_s`."""
    return httpx.Timeout(connect=5.0, read=read_s, write=60.0, pool=30.0) if read_s else ENGINE_TIMEOUT


class PeerGoneTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, except that a peer dying while httpcore connects is the httpx.ConnectError
    it is: anyio 4.x raises AttributeError there ('NoneType' object has no attribute 'getpeername'),
    which no `except httpx.HTTPError` catches, so a worker killed at the wrong moment answered 500
    instead of being retried elsewhere."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except AttributeError as exc:
            raise httpx.ConnectError(f"connection lost while connecting: {exc!r}", request=request) from exc


class HTTPBackend(Backend):
    """A Backend that reaches its engine through one pooled HTTP client (`self._client`)."""

    health_timeout_s: float = 5.0  # engines differ in how long /health may take when busy

    def __init__(self, url: str, instance_id: str, role: Role, model: str | None = None, *,
                 timeout: httpx.Timeout = ENGINE_TIMEOUT, bearer: str | None = None) -> None:
        super().__init__(url, instance_id, role, model)
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers,
                                         transport=PeerGoneTransport())

    async def close(self) -> None:
        await self._client.aclose()

    async def health(self) -> bool:
        try:
            resp = await self._client.get("/health", timeout=self.health_timeout_s)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200


def error_message(resp: httpx.Response) -> str:
    """The message of any engine error body: `{"error": {...}}`, `{"error": "..."}`,
    `{"object": "error", "message": ...}`, FastAPI's `{"detail": ...}` or plain text."""
    try:
        data = resp.json()
    except Exception:  # noqa: BLE001
        return resp.text[:500] or f"HTTP {resp.status_code}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return json.dumps(data)[:500]


def http_error(instance_id: str, resp: httpx.Response, message: str | None = None) -> BackendError:
    """A GPU engine's error status as BackendError, named after the instance; only overload and
    gateway statuses (429, 502-504) are marked retryable on another instance."""
    status = resp.status_code
    msg = message if message is not None else error_message(resp)
    return BackendError(f"{instance_id}: HTTP {status}: {msg}", status=status, retryable=status in (429, 502, 503, 504))


async def iter_sse(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of a `data: ...` event stream, up to `data: [DONE]`.

    Tolerates a space before the blank line (TensorRT-LLM chat) and ignores comments and blank lines.
    """
    async for line in resp.aiter_lines():
        line = line.strip()
        if not line or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            log.warning("unparseable stream line: %.200s", payload)
            continue
        if isinstance(data, list):  # a batch answer; we never send batches
            data = data[0] if data else {}
        yield data
