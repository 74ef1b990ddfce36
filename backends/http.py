"""HTTP plumbing the engine adapters share (SGLang, TensorRT-LLM and tetri's own workers).

Two pooled `httpx.AsyncClient`s per instance (`HTTPBackend`): `_client` carries requests and their
streams, bounded by `PoolLimits` and gated by stream slots (`slot()`: a full pool is `BackendBusy`,
never a health verdict); `_control` carries health, load, info and aborts on a small pool of its
own, so a busy data path can neither make an instance look dead nor block an abort. Also: reading
an engine's error body, mapping an HTTP error status to `BackendError`, and parsing SSE streams.
What each adapter sends stays in the adapter: this module only owns the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from backends.base import Backend, BackendBusy, BackendError, Role

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


@dataclass(frozen=True)
class PoolLimits:
    """Connections one orchestrator keeps to one instance (settings `backend_max_connections`,
    `backend_acquire_timeout_s`)."""

    max_connections: int = 256
    acquire_timeout_s: float = 10.0
    control_connections: int = 8


class HTTPBackend(Backend):
    """A Backend that reaches its engine through pooled HTTP clients: `_client` for requests
    (bounded, slot-gated), `_control` for health/load/info/abort."""

    health_timeout_s: float = 5.0  # engines differ in how long /health may take when busy

    def __init__(self, url: str, instance_id: str, role: Role, model: str | None = None, *,
                 timeout: httpx.Timeout = ENGINE_TIMEOUT, bearer: str | None = None,
                 pool: PoolLimits | None = None) -> None:
        super().__init__(url, instance_id, role, model)
        self.pool = pool or PoolLimits()
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        # The slots bound what is in flight; the pool has a little slack so httpx itself never waits.
        limits = httpx.Limits(max_connections=self.pool.max_connections + 4,
                              max_keepalive_connections=self.pool.max_connections)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers, limits=limits,
                                         transport=PeerGoneTransport())
        control_limits = httpx.Limits(max_connections=self.pool.control_connections,
                                      max_keepalive_connections=self.pool.control_connections)
        self._control = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10.0, pool=5.0), headers=headers,
                                          limits=control_limits, transport=PeerGoneTransport())
        self._slots = asyncio.Semaphore(self.pool.max_connections)

    @property
    def busy_slots(self) -> int:
        """Requests holding a connection slot now."""
        return self.pool.max_connections - self._slots._value

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of this instance's request slots for the duration of a call and its stream."""
        try:
            await asyncio.wait_for(self._slots.acquire(), self.pool.acquire_timeout_s)
        except TimeoutError:
            raise BackendBusy(f"{self.instance_id}: all {self.pool.max_connections} connections busy for "
                              f"{self.pool.acquire_timeout_s:.0f}s") from None
        try:
            yield
        finally:
            self._slots.release()

    async def close(self) -> None:
        await self._client.aclose()
        await self._control.aclose()

    async def health(self) -> bool:
        try:
            resp = await self._control.get("/health", timeout=self.health_timeout_s)
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


async def iter_lines(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The body's lines as bytes (no trailing newline), read to the end of the body, so the
    connection goes back to the pool. Cheaper than `aiter_lines`: no text decoding per line."""
    pending = b""
    async for chunk in resp.aiter_bytes():
        if pending:
            chunk = pending + chunk
        lines = chunk.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line
    if pending:
        yield pending


async def iter_sse(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of a `data: ...` event stream, up to `data: [DONE]`; whatever follows is read
    and dropped, so the body ends and the connection is reused.

    Tolerates a space before the blank line (TensorRT-LLM chat) and ignores comments and blank lines.
    """
    done = False
    async for line in iter_lines(resp):
        if done or not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            log.warning("unparseable stream line: %.200r", payload)
            continue
        if isinstance(data, list):  # a batch answer; we never send batches
            data = data[0] if data else {}
        yield data
