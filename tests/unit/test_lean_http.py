"""backends/lean_http.py against raw asyncio servers that answer exactly the bytes each test needs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from backends import lean_http
from backends.lean_http import LeanPool, StreamClosed

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


async def _serve(handler: Handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _post(pool: LeanPool) -> bytes:
    """One request read to its end, its connection given back."""
    resp = await pool.request("POST", "/x", b"{}")
    body = await resp.read()
    resp.release()
    return body


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def test_chunked_stream_keeps_the_connection_and_sends_headers() -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                head, body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append(head + body)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(_chunked(b"data: 1\n\n", b"data: 2\n\n"))
            await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=4, headers={"Authorization": "Bearer k"})
    for _ in range(3):
        resp = await pool.request("POST", "/generate", b'{"a": 1}', "Content-Type: application/json\r\n", 5)
        assert resp.status == 200
        assert await resp.read() == b"data: 1\n\ndata: 2\n\n"
        resp.release()
    assert connections == 1 and pool.open == 1 and len(pool.idle) == 1
    assert seen[0].startswith(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer k\r\n" in seen[0] and seen[0].endswith(b'\r\n\r\n{"a": 1}')
    await pool.close()
    assert pool.open == 0
    server.close()


async def test_content_length_and_close_delimited_bodies() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_request(reader)
        if b"/length" in head:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!")
        else:  # HTTP/1.0 style: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=4)
    resp = await pool.request("POST", "/length", b"{}")
    assert resp.status == 404 and await resp.read() == b"nope!"
    resp.release()
    resp = await pool.request("GET", "/close")
    assert await resp.read() == b"until the end"
    resp.release()
    await asyncio.sleep(0.05)
    assert pool.open == 0 and not pool.idle  # neither may be reused: the server closed both
    server.close()


async def test_a_kept_connection_the_server_closed_is_replaced_before_sending() -> None:
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await _read_request(reader)
        requests += 1
        writer.write(OK)
        await writer.drain()
        writer.close()  # keep-alive promised, then closed (an idle timeout)

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=2)
    for _ in range(3):
        assert await _post(pool) == b"ok"
        await asyncio.sleep(0.02)
    assert requests == 3 and pool.open == 0
    server.close()


async def test_a_request_on_a_kept_connection_closed_unanswered_is_sent_once_more() -> None:
    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await _read_request(reader)
        answered += 1
        writer.write(OK)
        await writer.drain()
        await reader.read(1)  # the next request on this connection: closed unanswered
        writer.transport.abort()

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=2)
    for _ in range(2):
        assert await _post(pool) == b"ok"
    assert answered == 2 and pool.open == 1
    await pool.close()
    server.close()


async def test_idle_connections_past_keepalive_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(OK)
            await writer.drain()

    server, url = await _serve(handler)
    monkeypatch.setattr(lean_http, "KEEPALIVE_S", 0.05)
    pool = LeanPool(url, limit=2)
    for pause in (0.0, 0.1):
        await asyncio.sleep(pause)
        assert await _post(pool) == b"ok"
    assert connections == 2 and pool.open == 1
    await pool.close()
    server.close()


async def test_a_stream_broken_midway_raises_and_frees_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        writer.transport.abort()

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=2)
    resp = await pool.request("POST", "/x", b"{}")
    got = []
    with pytest.raises(StreamClosed):
        async for chunk in resp.iter_any():
            got.append(chunk)
    assert got == [b"data: 1\n\n"]
    resp.release()
    assert pool.open == 0 and not pool.idle
    server.close()


async def test_read_timeout_malformed_answer_and_refused_connection() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    server, url = await _serve(silent)
    pool = LeanPool(url, limit=2)
    with pytest.raises(TimeoutError):
        await pool.request("POST", "/x", b"{}", read_timeout_s=0.1)
    assert pool.open == 0
    server.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    server, url = await _serve(garbage)
    pool = LeanPool(url, limit=2)
    with pytest.raises(StreamClosed):
        await pool.request("POST", "/x", b"{}", read_timeout_s=2)
    assert pool.open == 0
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await LeanPool(url, limit=2).request("POST", "/x", b"{}")


async def test_the_pool_bound_holds() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(_chunked(b"x"))
        await writer.drain()

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=2)
    held = [await pool.request("POST", "/x", b"{}") for _ in range(2)]
    with pytest.raises(ConnectionRefusedError):
        await pool.request("POST", "/x", b"{}")
    release.set()
    for resp in held:
        assert await resp.read() == b"x"
        resp.release()
    assert pool.open == 2 and len(pool.idle) == 2
    await pool.close()
    server.close()


async def test_a_large_body_pauses_the_socket_until_read() -> None:
    big = b"y" * (3 << 20)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        await writer.drain()

    server, url = await _serve(handler)
    pool = LeanPool(url, limit=1)
    resp = await pool.request("POST", "/x", b"{}")
    await asyncio.sleep(0.2)  # the server writes all it can; the client stops reading at the mark
    conn = resp._conn
    assert conn.buffered <= (1 << 20) + (1 << 18) and conn.paused
    assert await resp.read() == big
    resp.release()
    await pool.close()
    server.close()


def test_header_values_with_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError):
        LeanPool("http://127.0.0.1:1", limit=1, headers={"Authorization": "Bearer x\r\nEvil: 1"})
