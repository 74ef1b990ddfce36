"""The raw KV socket channel: bound to loopback by default, authenticated per connection, sizes held to
what the pool can take before any buffer is allocated, idle connections dropped."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from backends.engines import kv_socket
from backends.engines.api import KVPayload
from backends.engines.kv_socket import KVAnnounce, KVRefused, KVSocketServer, load_kv_secret, push_kv
from backends.engines.simulated.engine import SimEngine
from tests.conftest import serve_app

SECRET = b"test-kv-secret"
HUGE = 1 << 36  # 64 GiB


class Sink:
    """on_payload/admit of a tiny pool: records imports, holds `free_tokens`."""

    def __init__(self, free_tokens: int = 1000) -> None:
        self.free_tokens = free_tokens
        self.payloads: list[KVPayload] = []

    def on_payload(self, payload: KVPayload, lease_s: float) -> dict[str, Any]:
        self.payloads.append(payload)
        return {"lease_id": "L", "deadline": time.time() + lease_s, "num_tokens": payload.num_tokens}

    def admit(self, announce: KVAnnounce, inflight_tokens: int) -> None:
        if announce.num_tokens + inflight_tokens > self.free_tokens:
            raise KVRefused(507, "KV pool full")


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def server(sink: Sink) -> Iterator[KVSocketServer]:
    srv = KVSocketServer(sink.on_payload, SECRET, admit=sink.admit, idle_timeout_s=0.5, max_connections=4).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the receive buffers the channel allocates."""
    sizes: list[int] = []
    real = kv_socket._allocate

    def spy(size: int):
        sizes.append(size)
        return real(size)

    monkeypatch.setattr(kv_socket, "_allocate", spy)
    return sizes


def _payload(tokens: int = 8, model: str = "m") -> KVPayload:
    data = torch.arange(2 * tokens, dtype=torch.float16).reshape(1, 2, tokens, 1, 1)
    return KVPayload(request_id="r1", num_tokens=tokens, data=data, model=model)


def _header(tokens: int, model: str = "m") -> bytes:
    """A KV header (4-byte length + JSON) announcing `tokens` tokens of shape (1, 2, tokens, 1, 1) float16."""
    raw = json.dumps({"request_id": "r1", "num_tokens": tokens, "model": model, "dtype": "float16",
                      "shape": [1, 2, tokens, 1, 1], "extra": {}}).encode()
    raw = raw.ljust(-(-(4 + len(raw)) // 64) * 64 - 4)  # padded as backends.engines.kv_codec pads it
    return struct.pack(">I", len(raw)) + raw


def _raw_push(port: int, size: int, rest: bytes, secret: bytes | None = SECRET) -> dict[str, Any]:
    """Handshake by hand: the frame length, a MAC (right, or garbage when `secret` is None), `rest`."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        replies = sock.makefile("rb")
        hello = replies.read(20)
        assert hello[:4] == b"TKV2"
        mac = kv_socket._mac(secret, hello[4:], size) if secret else os.urandom(32)
        sock.sendall(struct.pack(">Q", size) + mac + rest)
        return json.loads(replies.readline())


def test_default_bind_is_loopback(sink: Sink) -> None:
    srv = KVSocketServer(sink.on_payload, SECRET)
    try:
        assert srv.host == "127.0.0.1"
    finally:
        srv.stop()


def test_a_worker_binds_its_kv_socket_to_its_own_host() -> None:
    from backends.engines.server import create_worker_app

    app = create_worker_app(SimEngine(profile="cpu-smollm2", speed=50.0), backend="sim", kv_secret=SECRET)
    with serve_app(app):
        assert app.state.worker.kv_socket.host == "127.0.0.1"


def test_an_authenticated_push_is_imported(server: KVSocketServer, sink: Sink) -> None:
    payload = _payload(tokens=8)
    lease = push_kv("127.0.0.1", server.port, payload, lease_s=5.0, secret=SECRET)
    assert lease["lease_id"] == "L" and lease["num_tokens"] == 8 and "wire_s" in lease
    assert len(sink.payloads) == 1 and torch.equal(sink.payloads[0].data, payload.data)


def test_an_unauthenticated_connection_is_refused(server: KVSocketServer, sink: Sink, allocations: list[int]) -> None:
    with pytest.raises(KVRefused) as refused:
        push_kv("127.0.0.1", server.port, _payload(), lease_s=5.0, secret=b"another secret")
    assert refused.value.status == 401
    header = _header(8)
    reply = _raw_push(server.port, len(header) + 32, header + bytes(32), secret=None)
    assert reply["status"] == 401
    assert sink.payloads == [] and allocations == []


def test_an_oversize_header_is_refused_without_allocating(server: KVSocketServer, allocations: list[int]) -> None:
    before = _vm_size()
    # Authenticated, and the header announces the whole 64 GiB: more tokens than the pool has free.
    header = _header((HUGE - 192) // 4)
    assert len(header) + 4 * ((HUGE - 192) // 4) == HUGE
    assert _raw_push(server.port, HUGE, header)["status"] == 507
    # A length the header does not account for, and a length over the absolute ceiling.
    assert _raw_push(server.port, HUGE, _header(8))["status"] == 400
    assert _raw_push(server.port, 1 << 40, _header(8))["status"] == 413
    # Unauthenticated: refused before even the header is read.
    assert _raw_push(server.port, HUGE, b"", secret=None)["status"] == 401
    assert allocations == []
    assert _vm_size() - before < 1 << 30  # the old channel reserved the announced 64 GiB here
    # The channel still serves a push that fits.
    assert push_kv("127.0.0.1", server.port, _payload(), lease_s=5.0, secret=SECRET)["lease_id"] == "L"


def test_concurrent_pushes_share_the_free_space() -> None:
    # Admission counts tokens admitted on other connections and not yet imported: two pushes of 8
    # tokens into 10 free, the first one still importing, the second is refused.
    import threading

    sink = Sink(free_tokens=10)
    importing, release = threading.Event(), threading.Event()

    def slow_import(payload: KVPayload, lease_s: float) -> dict[str, Any]:
        importing.set()
        release.wait(10)
        return sink.on_payload(payload, lease_s)

    srv = KVSocketServer(slow_import, SECRET, admit=sink.admit).start()
    try:
        first: list[dict[str, Any]] = []
        pusher = threading.Thread(target=lambda: first.append(push_kv("127.0.0.1", srv.port, _payload(8), 5.0, SECRET)))
        pusher.start()
        assert importing.wait(10)
        with pytest.raises(KVRefused) as refused:
            push_kv("127.0.0.1", srv.port, _payload(8), lease_s=5.0, secret=SECRET)
        assert refused.value.status == 507
        release.set()
        pusher.join(10)
        assert first and first[0]["lease_id"] == "L"
        assert push_kv("127.0.0.1", srv.port, _payload(8), lease_s=5.0, secret=SECRET)["lease_id"] == "L"
    finally:
        release.set()
        srv.stop()


def test_an_idle_connection_is_closed_after_the_timeout(server: KVSocketServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
        assert silent.recv(20)[:4] == b"TKV2"
        stalled.recv(20)
        stalled.sendall(b"\x00\x00")  # two bytes of the frame length, then nothing
        started = time.monotonic()
        assert _read_to_eof(silent) == b"" and _read_to_eof(stalled) == b""
        assert time.monotonic() - started < 5


def test_connections_over_the_cap_are_closed_at_once(server: KVSocketServer) -> None:
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        for sock in held:
            assert sock.recv(20)[:4] == b"TKV2"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            assert _read_to_eof(extra) == b""  # no hello, no thread
        # Once the held ones time out, the channel serves again.
        for sock in held:
            _read_to_eof(sock)
        time.sleep(0.1)
        assert push_kv("127.0.0.1", server.port, _payload(), lease_s=5.0, secret=SECRET)["lease_id"] == "L"
    finally:
        for sock in held:
            sock.close()


def test_the_secret_comes_from_the_environment_or_a_private_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TETRI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TETRI_KV_SECRET", "from-env")
    assert load_kv_secret() == b"from-env"
    monkeypatch.delenv("TETRI_KV_SECRET")
    first = load_kv_secret()
    assert len(first) == 64 and load_kv_secret() == first  # workers of this user on this machine share it
    assert stat.S_IMODE((tmp_path / "kv_secret").stat().st_mode) == 0o600


def _prefill(prefill_url: str, decode_url: str, rid: str) -> dict[str, Any]:
    body = {"request_id": rid, "prompt_ids": list(range(100, 140)),
            "sampling": {"max_tokens": 4, "ignore_eos": True}, "handoff": {"decode_url": decode_url, "lease_s": 5}}
    resp = httpx.post(f"{prefill_url}/prefill", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["kv"]


def test_workers_push_kv_over_the_authenticated_socket_and_fall_back_to_http_on_a_wrong_secret() -> None:
    from backends.engines.server import create_worker_app

    def worker(role: str, secret: bytes):
        return create_worker_app(SimEngine(profile="cpu-smollm2", role=role, speed=50.0), backend="sim",  # type: ignore[arg-type]
                                 kv_secret=secret)

    decode_app = worker("decode", SECRET)
    with serve_app(decode_app) as decode_url, serve_app(worker("prefill", SECRET)) as prefill_url, \
            serve_app(worker("prefill", b"wrong")) as stranger_url:
        kv = _prefill(prefill_url, decode_url, "ok")
        assert kv["lease_id"] and "wire_s" in kv["extra"]  # the socket channel took it
        assert decode_app.state.worker.leases["ok"].num_tokens == 40
        kv = _prefill(stranger_url, decode_url, "stranger")
        assert kv["lease_id"] and "wire_s" not in kv["extra"]  # refused on the socket, pushed over HTTP
        # The worker holds a push to its pool's size before it allocates anything.
        state = decode_app.state.worker
        header = _header((HUGE - 192) // 4, model=state.core.model_name)
        reply = _raw_push(state.kv_socket.port, HUGE, header)
        assert reply["status"] == 413 and "exceeds the pool" in reply["error"]


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
