"""HTTP plumbing the engine adapters share (SGLang, TensorRT-LLM and tetri's own workers).

Per instance (`HTTPBackend`): a data pool for generation streams (`stream_post`, on
`lean_http.LeanPool`: keep-alive connections parsed by httptools, at under half aiohttp's CPU per
request and a fraction of httpx's), bounded by `PoolLimits` and
gated by stream slots (`slot()`: a full pool is `BackendBusy`, never a health verdict); `_control`
(httpx) for health, load, info and aborts on a small pool of its own, so a busy data path can
neither make an instance look dead nor block an abort; and `_client` (httpx, same limits) for the
adapters' other calls. Also: reading an engine's error body, mapping an HTTP error status to
`BackendError`, and parsing SSE and NDJSON streams as bytes, read to the end of the body.
What each adapter sends stays in the adapter: this module only owns the transport.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson

from backends.base import Backend, BackendBusy, BackendError, Role
from backends.lean_http import LeanPool, LeanResponse, Sending
from backends.tracing import TRACEPARENT

log = logging.getLogger("tetri.backends.http")

# GPU engines: a long generation may stream for many minutes, so reads wait long.
ENGINE_TIMEOUT = httpx.Timeout(connect=5.0, read=900.0, write=60.0, pool=30.0)


def engine_timeout(read_s: float | None = None) -> httpx.Timeout:
    """`ENGINE_TIMEOUT`, with the read timeout replaced when an instance sets `timeout_s`."""
    return httpx.Timeout(connect=5.0, read=read_s, write=60.0, pool=30.0) if read_s else ENGINE_TIMEOUT


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process, for every httpx client: building one reads the CA
    bundle (~20 ms of CPU), which each new client did on the event loop, so registering an instance
    (three clients) stalled every stream for ~60 ms and delayed the instance's first traffic."""
    return httpx.create_ssl_context()


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


_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own


def transport(limits: httpx.Limits | None = None) -> PeerGoneTransport:
    """An httpx transport with the shared TLS context; `limits` go here, since an httpx client
    given a transport ignores its own `limits`."""
    return PeerGoneTransport(verify=tls_context(), limits=limits or _DEFAULT_LIMITS)


@dataclass(frozen=True)
class PoolLimits:
    """Connections one orchestrator keeps to one instance (settings `backend_max_connections`,
    `backend_acquire_timeout_s`): `max_connections` in all, of which up to `control_connections`
    (an eighth at most) are held back for load polls, health and aborts; the rest carry streams.
    A pool under 16 reserves none: its control calls get one connection of each kind on top."""

    max_connections: int = 256
    acquire_timeout_s: float = 10.0
    control_connections: int = 8

    @property
    def control(self) -> int:
        return 0 if self.max_connections < 16 else min(self.control_connections, self.max_connections // 8)

    @property
    def streams(self) -> int:
        """Requests (and their streams) in flight at once: one connection each."""
        return max(1, self.max_connections - self.control)

    @property
    def polls(self) -> int:
        return max(1, self.control // 2)

    @property
    def calls(self) -> int:
        """health, info, aborts and admin calls (httpx)."""
        return max(1, self.control - self.polls)


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
        # The slots bound what is in flight, and a stream gives its connection back before its slot.
        limits = httpx.Limits(max_connections=self.pool.streams, max_keepalive_connections=self.pool.streams)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers,
                                         transport=transport(limits))
        control_limits = httpx.Limits(max_connections=self.pool.calls, max_keepalive_connections=self.pool.calls)
        self._control = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10.0, pool=5.0), headers=headers,
                                          transport=transport(control_limits))
        self._slots = asyncio.Semaphore(self.pool.streams)
        self._read_timeout_s = timeout.read
        self._headers = headers
        self._data: LeanPool | None = None
        self._polls: aiohttp.ClientSession | None = None

    @property
    def busy_slots(self) -> int:
        """Requests holding a connection slot now."""
        return self.pool.streams - self._slots._value

    def slot(self) -> _Slot:
        """`async with`: one of this instance's request slots for the duration of a call and its stream
        (a full pool for `acquire_timeout_s` is BackendBusy)."""
        return _Slot(self)

    def _session(self) -> LeanPool:
        if self._data is None or self._data.closed:
            self._data = LeanPool(self.url, self.pool.streams, connect_timeout_s=5.0, headers=self._headers,
                                  ssl_context=tls_context())
        return self._data

    async def poll_get(self, path: str, timeout_s: float) -> Polled:
        """A control-plane GET read whole (the monitor's load polls: 10 per second per instance, so
        on aiohttp, like the streams). Its own small pool: never queued behind the streams."""
        if self._polls is None or self._polls.closed:
            self._polls = aiohttp.ClientSession(self.url, headers=self._headers, auto_decompress=True,
                                                connector=aiohttp.TCPConnector(limit=self.pool.polls))
        try:
            async with self._polls.get(path, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return Polled(resp.status, await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendError(f"{self.instance_id}: GET {path} failed: {exc!r}", status=503, retryable=True) from exc

    async def stream_send(self, path: str, payload: bytes) -> PendingStream:
        """POST a JSON body on the data pool, without waiting for the answer (it waits only to open
        a connection when no kept one is free). The caller holds a `slot()`; a refused connection
        raises a retryable BackendError."""
        try:
            # The request's W3C trace context, when tracing is on (orchestrator/tracing.py).
            traceparent = TRACEPARENT.get()
            headers = _JSON if traceparent is None else f"{_JSON}traceparent: {traceparent}\r\n"
            sending = await self._session().send("POST", path, payload, headers, self._read_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise _post_failed(self.instance_id, path, exc) from exc
        return PendingStream(sending, self.instance_id, path)

    async def stream_post(self, path: str, payload: bytes) -> DataStream:
        """`stream_send`, then the response once its headers are in."""
        return await (await self.stream_send(path, payload)).response()

    async def close(self) -> None:
        await self._client.aclose()
        await self._control.aclose()
        for session in (self._data, self._polls):
            if session is not None:
                await session.close()

    async def health(self) -> bool:
        try:
            resp = await self._control.get("/health", timeout=self.health_timeout_s)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200


_JSON = "Content-Type: application/json\r\n"


@dataclass(frozen=True)
class Polled:
    """A control GET's answer, read whole, in the shape callers use of an httpx.Response."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


class _Slot:
    """HTTPBackend.slot(): a class, not a generator-based context manager (one per stream)."""

    __slots__ = ("backend",)

    def __init__(self, backend: HTTPBackend) -> None:
        self.backend = backend

    async def __aenter__(self) -> None:
        b = self.backend
        try:
            if b._slots.locked():  # wait_for costs a task: only when a wait is possible
                await asyncio.wait_for(b._slots.acquire(), b.pool.acquire_timeout_s)
            else:
                await b._slots.acquire()
        except TimeoutError:
            raise BackendBusy(f"{b.instance_id}: all {b.pool.streams} stream connections busy for "
                              f"{b.pool.acquire_timeout_s:.0f}s") from None

    async def __aexit__(self, *exc: object) -> None:
        self.backend._slots.release()


def _post_failed(instance_id: str, path: str, exc: BaseException) -> BackendError:
    return BackendError(f"{instance_id}: POST {path} failed: {exc!r}", status=503, retryable=True)


class PendingStream:
    """A POST written on the data pool whose answer has not begun: `response()` waits for it."""

    __slots__ = ("sending", "instance_id", "path")

    def __init__(self, sending: Sending, instance_id: str, path: str) -> None:
        self.sending, self.instance_id, self.path = sending, instance_id, path

    async def response(self) -> DataStream:
        try:
            return DataStream(await self.sending.response(), self.instance_id)
        except (OSError, TimeoutError) as exc:
            raise _post_failed(self.instance_id, self.path, exc) from exc

    def close(self) -> None:
        self.sending.close()


class DataStream:
    """One response on the data pool: its status, its error message, and its body's lines read to
    the end (the connection then goes back to the pool); `close()` drops an unfinished one."""

    def __init__(self, resp: LeanResponse, instance_id: str) -> None:
        self.resp = resp
        self.status = resp.status
        self.instance_id = instance_id

    async def message(self) -> str:
        """The error message of this (error status) response; the body is read and released."""
        try:
            text = (await self.resp.read()).decode("utf-8", "replace")
        except (OSError, TimeoutError):
            text = ""
        finally:
            self.resp.release()
        return message_of(text, self.status)

    async def error(self) -> BackendError:
        """This (error status) response as `http_error` makes it."""
        return BackendError(f"{self.instance_id}: HTTP {self.status}: {await self.message()}", status=self.status,
                            retryable=self.status in (429, 502, 503, 504))

    async def blocks(self, sse: bool = False) -> AsyncIterator[list[bytes]]:
        """The body's complete lines, one list per network read (a burst of tokens is one block,
        and everything downstream then runs once per block, not once per token); `sse`: the
        `data:` payloads of those lines instead, unparsed, up to `data: [DONE]`. Read to the end
        (the connection goes back to the pool); one left early drops the connection. One generator,
        not a stack of them: it runs once per network read of every stream."""
        pending = b""
        done = False
        resp = self.resp
        try:
            while (piece := await resp.piece()) is not None:
                if done:
                    continue  # past [DONE]: read to the end of the body and drop it
                if pending:
                    piece = pending + piece
                lines = piece.split(b"\n")
                pending = lines.pop()
                if sse:
                    lines, done = sse_payloads(lines)
                if lines:
                    yield lines
            if pending and not done:
                lines, done = sse_payloads([pending]) if sse else ([pending], False)
                if lines:
                    yield lines
            # A body that ended early without its terminator is an error the caller sees by its content.
            resp.release()
        except (OSError, TimeoutError) as exc:
            raise BackendError(f"{self.instance_id}: stream broke: {exc!r}", status=503, retryable=True) from exc
        finally:
            resp.close()  # left before the end (or broken): the connection is dropped; else a no-op

    async def lines(self) -> AsyncIterator[bytes]:
        async for block in self.blocks():
            for line in block:
                yield line

    def close(self) -> None:
        self.resp.close()


def message_of(text: str, status: int) -> str:
    """`error_message` for a body already read as text."""
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or f"HTTP {status}"
    return _message_of_data(data)


def error_message(resp: httpx.Response | Polled) -> str:
    """The message of any engine error body: `{"error": {...}}`, `{"error": "..."}`,
    `{"object": "error", "message": ...}`, FastAPI's `{"detail": ...}` or plain text."""
    try:
        data = resp.json()
    except Exception:  # noqa: BLE001
        return resp.text[:500] or f"HTTP {resp.status_code}"
    return _message_of_data(data)


def _message_of_data(data: Any) -> str:
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


def http_error(instance_id: str, resp: httpx.Response | Polled, message: str | None = None) -> BackendError:
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
    """`sse_events` of an httpx response."""
    async for data in sse_events(iter_lines(resp)):
        yield data


async def sse_events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of a `data: ...` event stream, up to `data: [DONE]`; whatever follows is read
    and dropped, so the body ends and the connection is reused.

    Tolerates a space before the blank line (TensorRT-LLM chat) and ignores comments and blank lines.
    """
    done = False
    async for line in lines:
        if done:
            continue
        data = _sse_data(line)
        if data is _DONE:
            done = True
        elif data is not None:
            yield data  # type: ignore[misc]


def sse_payloads(lines: list[bytes]) -> tuple[list[bytes], bool]:
    """The `data:` payloads of these lines up to `[DONE]`, and whether `[DONE]` was among them."""
    batch = []
    for line in lines:
        payload = _payload(line)
        if payload == b"[DONE]":
            return batch, True
        if payload is not None:
            batch.append(payload)
    return batch, False


def _payload(line: bytes) -> bytes | None:
    """The payload of a `data:` line; None for any other line (comments, blank lines)."""
    return line[5:].strip() if line.startswith(b"data:") else None


_DONE = object()


def _sse_data(line: bytes) -> dict[str, Any] | object | None:
    """The JSON object of one `data:` line, `_DONE` for `[DONE]`, None for anything else."""
    payload = _payload(line)
    if payload is None:
        return None
    return _DONE if payload == b"[DONE]" else parse_sse_payload(payload)


def parse_sse_payload(payload: bytes) -> dict[str, Any] | None:
    """The JSON object of one `data:` payload; None (logged) for one that does not parse."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        log.warning("unparseable stream line: %.200r", payload)
        return None
    if isinstance(data, list):  # a batch answer; we never send batches
        data = data[0] if data else {}
    return data
