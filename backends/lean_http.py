"""A lean HTTP/1.1 client for the generation streams: keep-alive connections on asyncio protocols,
responses parsed by httptools (llhttp, the parser uvicorn uses).

Why not aiohttp here: with two upstream streams per P/D request, aiohttp's per-request machinery
(request and response objects, URL handling, header multidicts, tracing hooks, timers) was the
largest single share of the router's CPU under load (docs/benchmarks.md, the router benchmark).
A stream here is one write of pre-built headers and body, and the body's bytes as they arrive.

Scope, on purpose: POST and GET with a bytes body, no redirects, no proxies, no cookies, no
compression (we ask for none). http and https. A connection is reused only after a response read to
its end that the server allows to be kept; an idle one is dropped before the server's keep-alive
timeout (uvicorn's default is 5 s), and a request whose reused connection turns out closed before
any answer is sent once more on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

# Below uvicorn's default keep-alive timeout (5 s): a connection the server is about to close is
# dropped here first, instead of racing the server's close with a new request.
KEEPALIVE_S = 4.0
_HIGH_WATER = 1 << 20  # unread body bytes before the socket is paused


class StreamClosed(ConnectionError):
    """The connection ended before the response did."""


class _Conn(asyncio.Protocol):
    """One connection; one response at a time. Parser callbacks fill the state the reader awaits."""

    def __init__(self, pool: LeanPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.counted = True  # counted in the pool's `open`
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.done = False
        self.keep_alive = False
        self.framed = False  # a Content-Length or chunked body: its end is known without a close
        self.body: list[bytes] = []
        self.buffered = 0
        self.received = False
        self.error: BaseException | None = None
        self.paused = False

    # ---- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(StreamClosed(f"malformed HTTP response: {exc}"))
            self.pool.discard(self)
            return
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            if self.headers_done and not self.framed and exc is None:
                self.done = True  # a body delimited by the close
            else:
                self.error = StreamClosed(f"connection closed by the server{f': {exc!r}' if exc else ''}")
        self.pool.forget(self)
        self._wake()

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # ---- the reader's side -----------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float | None) -> None:
        """Until the parser or the connection has news."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _expire, waiter, timeout_s) if timeout_s else None
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        """The body bytes received so far, as one piece."""
        body, self.body = self.body, []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return body[0] if len(body) == 1 else b"".join(body)


def _expire(waiter: asyncio.Future[None], timeout_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no data from the server for {timeout_s:g} s"))


class LeanResponse:
    """A response once its headers are in: `status`, then its body (`iter_any`, `read`).
    `release()` gives the connection back when the body was read to its end, else closes it."""

    __slots__ = ("_conn", "status", "_timeout_s", "_closed")

    def __init__(self, conn: _Conn, timeout_s: float | None) -> None:
        self._conn = conn
        self.status = conn.status
        self._timeout_s = timeout_s
        self._closed = False

    async def piece(self) -> bytes | None:
        """The body's bytes received since the last call (waiting for some), None at its end."""
        conn = self._conn
        while True:
            if conn.body:
                return conn.take()
            if conn.done:
                return None
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._timeout_s)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (one piece per wake-up), to its end."""
        while (piece := await self.piece()) is not None:
            yield piece

    async def read(self) -> bytes:
        parts = []
        while (piece := await self.piece()) is not None:
            parts.append(piece)
        return b"".join(parts)

    def release(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.done and conn.keep_alive and not conn.lost and not conn.body:
            conn.pool.give_back(conn)
        else:
            conn.pool.discard(conn)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.pool.discard(self._conn)


class Sending:
    """A request written on a connection, its response not yet begun."""

    __slots__ = ("pool", "data", "timeout_s", "conn", "reused", "tries")

    def __init__(self, pool: LeanPool, data: bytes, timeout_s: float | None) -> None:
        self.pool, self.data, self.timeout_s = pool, data, timeout_s
        self.conn: _Conn | None = None
        self.reused = False
        self.tries = 0

    async def write(self) -> None:
        pool = self.pool
        conn = pool._reusable()
        self.reused = conn is not None
        if conn is None:
            conn = await pool._connect()
        conn._reset()
        assert conn.transport is not None
        conn.transport.write(self.data)
        self.conn = conn
        self.tries += 1

    async def response(self) -> LeanResponse:
        """The response once its headers are in. A kept connection that the server closed before
        reading the request (its keep-alive ran out as we sent) is replaced and the request sent
        once more."""
        while True:
            conn = self.conn
            assert conn is not None
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.timeout_s)
            except StreamClosed:
                self.pool.discard(conn)
                if self.reused and not conn.received and self.tries < 2:
                    await self.write()
                    continue
                raise
            except BaseException:
                self.pool.discard(conn)
                raise
            return LeanResponse(conn, self.timeout_s)

    def close(self) -> None:
        """Drop the request (its response will not be read)."""
        if self.conn is not None:
            self.pool.discard(self.conn)


class LeanPool:
    """Keep-alive connections to one server, at most `limit` open at once (the callers' stream
    slots already bound what is in flight; this bound is the pool's own promise)."""

    def __init__(self, url: str, limit: int, connect_timeout_s: float = 5.0,
                 headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.base = parts.path.rstrip("/")
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.ssl_context = ssl_context
        host = self.host if ":" not in self.host else f"[{self.host}]"
        default_port = (443 if self.tls else 80) == self.port
        if any(c in f"{k}{v}" for k, v in (headers or {}).items() for c in "\r\n"):
            raise ValueError("a header name or value holds a line break")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._host_header = f"Host: {host}{'' if default_port else f':{self.port}'}\r\n{extra}"
        self.idle: list[_Conn] = []
        self.open = 0
        self.closed = False

    async def _connect(self) -> _Conn:
        if self.open >= self.limit:
            raise ConnectionRefusedError(f"all {self.limit} connections to {self.host}:{self.port} are in use")
        self.open += 1
        made: list[_Conn] = []

        def factory() -> _Conn:
            made.append(_Conn(self))
            return made[-1]

        try:
            loop = asyncio.get_running_loop()
            ssl_ctx = (self.ssl_context or ssl.create_default_context()) if self.tls else None
            _, conn = await asyncio.wait_for(
                loop.create_connection(factory, self.host, self.port, ssl=ssl_ctx,
                                       server_hostname=self.host if self.tls else None),
                self.connect_timeout_s)
        except BaseException:
            for half in made:
                half.counted = False
                half.lost = True
            self.open -= 1
            raise
        return conn

    def _reusable(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the least likely to be closed
            if conn.lost or conn.transport is None or conn.transport.is_closing():
                continue  # forget() already counted it out
            if now - conn.idle_since > KEEPALIVE_S:
                self.discard(conn)
                continue
            return conn
        return None

    async def send(self, method: str, path: str, body: bytes = b"", extra_headers: str = "",
                   read_timeout_s: float | None = None) -> Sending:
        """Write one request; waits only to open a connection when no kept one is free, so two
        requests to two pools go out in the same loop pass without a task each. Raises OSError
        (refused), TimeoutError (connecting) or StreamClosed."""
        if self.closed:
            raise StreamClosed("the pool is closed")
        head = (f"{method} {self.base}{path} HTTP/1.1\r\n{self._host_header}{extra_headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        sending = Sending(self, head + body, read_timeout_s)
        await sending.write()
        return sending

    async def request(self, method: str, path: str, body: bytes = b"", extra_headers: str = "",
                      read_timeout_s: float | None = None) -> LeanResponse:
        """`send`, then the response once its headers are in."""
        sending = await self.send(method, path, body, extra_headers, read_timeout_s)
        return await sending.response()

    # ---- bookkeeping -----------------------------------------------------------------------
    def give_back(self, conn: _Conn) -> None:
        if self.closed:
            self.discard(conn)
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def discard(self, conn: _Conn) -> None:
        """Close a connection that cannot be reused (idempotent)."""
        conn.lost = True
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.close()
        self.forget(conn)

    def forget(self, conn: _Conn) -> None:
        """Count a closed (or closing) connection out, once."""
        conn.lost = True
        if conn.counted:
            conn.counted = False
            self.open -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    async def close(self) -> None:
        self.closed = True
        for conn in list(self.idle):
            self.discard(conn)
