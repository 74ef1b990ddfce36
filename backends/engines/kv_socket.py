"""A raw TCP channel for KV pushes between workers: one `sendall` of the tensor's memory on the
sending side, `recv_into` one preallocated buffer on the receiving side. On loopback this moves
KV several times faster than an HTTP body, which Python parses chunk by chunk.

One push per connection:

1. receiver: ``TKV2`` and a 16-byte random nonce.
2. sender: the frame length (8 bytes, big-endian), HMAC-SHA256(secret, nonce + length) (32 bytes),
   then the KV header of `encode_kv_chunks` (4-byte length + JSON).
3. receiver: checks the MAC in constant time, that the length is the header plus the tensor the
   header announces, and that the KV pool has room for it (`admit`); only then allocates the
   buffer. Answers one JSON line: ``{"status": 100}`` (go on) or ``{"status": 4xx/5xx, "error"}``
   and closes. When the header's extra has ``skip_ok`` and ``block_hashes`` (the prefix hashes of
   the KV's full blocks) and the receiver's prefix cache holds the leading ones, the go-on says
   ``"skip_tokens": N``: the sender then sends positions N.. only (the frame shrinks by that much).
4. sender: the tensor bytes. Receiver: ``{"status": 200, "lease": {...}}`` or an error line (410:
   the held prefix was evicted meanwhile; the sender pushes the whole KV again).

The secret is shared by the deployment's workers: TETRI_KV_SECRET, else a random one kept in the
cache directory (mode 0600), which every worker of one user on one machine finds without setup (as
Erlang's cookie file). Connections idle past `idle_timeout_s` are closed, and at most
`max_connections` are served at once: each costs a thread (8 MiB of stack, a malloc arena).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends.engines.api import KVPayload
from backends.engines.kv_codec import decode_kv, encode_kv_chunks, encoded_size, tensor_chunks

log = logging.getLogger("tetri.engines.kv_socket")
_MAGIC = b"TKV2"
_NONCE_BYTES = 16
_MAC_BYTES = hashlib.sha256().digest_size
_RECV_CHUNK = 1 << 22
_MAX_FRAME = 1 << 36  # absolute ceiling; `admit` holds each frame to what the pool can take
_MAX_HEADER = 1 << 21  # the JSON header of a KV: a few hundred bytes and its block hashes (~20 bytes per 16 tokens)
_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # the dtypes kv_codec decodes
_SECRET_ENV = "TETRI_KV_SECRET"


class KVRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class KVAnnounce:
    """What a push's header announces, read before any buffer is allocated for it."""

    request_id: str
    model: str
    num_tokens: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # the tensor's bytes
    block_hashes: tuple[int, ...] = ()  # prefix hashes of its full blocks, when the sender may skip held ones


# Called on the receiving side with the payload and the lease length; returns the lease as a dict
# or raises KVRefused.
OnPayload = Callable[[KVPayload, float], dict[str, Any]]
# Called before the buffer is allocated, with the tokens of other pushes admitted but not yet
# imported; raises KVRefused when the pool cannot take this one, else returns the leading positions
# the receiver already holds (the sender skips them; 0: send all).
Admit = Callable[[KVAnnounce, int], int]


def load_kv_secret() -> bytes:
    """TETRI_KV_SECRET, else the machine's shared secret file (created on first use)."""
    from_env = os.environ.get(_SECRET_ENV, "").strip()
    if from_env:
        return from_env.encode()
    from backends.engines.paths import cache_dir

    path = cache_dir() / "kv_secret"
    if not path.exists():
        tmp = path.with_name(f".kv_secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic: when workers start together, the first one's secret wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    secret = path.read_text().strip()
    if not secret:
        raise RuntimeError(f"KV secret file {path} is empty: delete it or set {_SECRET_ENV}")
    return secret.encode()


def _mac(secret: bytes, nonce: bytes, size: int) -> bytes:
    return hmac.new(secret, nonce + struct.pack(">Q", size), hashlib.sha256).digest()


def _allocate(size: int) -> np.ndarray:
    """The receive buffer (a seam for tests: nothing else allocates per connection)."""
    return np.empty(size, dtype=np.uint8)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler],
                 max_connections: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Over the cap, close at once rather than start one more thread.
        if not self._slots.acquire(blocking=False):
            log.warning("KV socket: %s refused, too many connections", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class KVSocketServer:
    def __init__(
        self, on_payload: OnPayload, secret: bytes, host: str = "127.0.0.1", port: int = 0,
        admit: Admit | None = None, idle_timeout_s: float = 10.0, max_connections: int = 32,
        max_frame: int = _MAX_FRAME,
    ) -> None:
        if not secret:
            raise ValueError("the KV socket channel needs a secret")
        self._secret = secret
        self._on_payload = on_payload
        self._admit = admit
        self.idle_timeout_s = idle_timeout_s
        self.max_frame = max_frame
        self._lock = threading.Lock()
        self._inflight_tokens = 0
        self._server = _Server((host, port), _handler_for(self), max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kv-socket", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> KVSocketServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a serve_forever that never started otherwise
            self._server.shutdown()
        self._server.server_close()

    def serve(self, sock: socket.socket) -> None:
        """One connection: handshake, admission, body, answer."""
        sock.settimeout(self.idle_timeout_s)  # every recv below: an idle peer is dropped
        nonce = secrets.token_bytes(_NONCE_BYTES)
        admitted = 0
        try:
            sock.sendall(_MAGIC + nonce)
            size, mac = struct.unpack(f">Q{_MAC_BYTES}s", _recv_exact(sock, 8 + _MAC_BYTES))
            if not hmac.compare_digest(mac, _mac(self._secret, nonce, size)):
                raise KVRefused(401, "KV push not authenticated (TETRI_KV_SECRET differs between workers?)")
            started = time.perf_counter()
            prefix, announce = self._read_header(sock, size)
            skip = 0
            with self._lock:
                if self._admit is not None:
                    skip = self._admit(announce, self._inflight_tokens) or 0
                self._inflight_tokens += announce.num_tokens
                admitted = announce.num_tokens
            reply = self._receive(sock, size, prefix, started, announce, skip)
        except KVRefused as exc:
            reply = {"status": exc.status, "error": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"status": 400, "error": f"bad KV payload: {exc}"}
        except TimeoutError:
            log.info("KV socket: closed a connection idle for %.0f s", self.idle_timeout_s)
            return
        except OSError as exc:
            log.warning("KV push broke: %s", exc)
            return
        finally:
            if admitted:
                with self._lock:
                    self._inflight_tokens -= admitted
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(reply).encode() + b"\n")
            if reply["status"] != 200:
                _linger(sock)


    def _read_header(self, sock: socket.socket, size: int) -> tuple[bytes, KVAnnounce]:
        if size > self.max_frame:
            raise KVRefused(413, f"KV frame of {size} bytes is too large")
        (hlen,) = struct.unpack(">I", _recv_exact(sock, 4))
        if hlen > min(_MAX_HEADER, size - 4):
            raise KVRefused(400, f"KV header of {hlen} bytes in a frame of {size}")
        raw = _recv_exact(sock, hlen)
        header = json.loads(raw)
        dtype = str(header["dtype"])
        if dtype not in _ELEMENT_BYTES:
            raise ValueError(f"unsupported KV dtype {dtype!r}")
        shape = tuple(int(d) for d in header["shape"])
        if any(d < 0 for d in shape):
            raise ValueError(f"negative KV shape {shape}")
        nbytes = _ELEMENT_BYTES[dtype]
        for d in shape:
            nbytes *= d
        if 4 + hlen + nbytes != size:
            raise KVRefused(400, f"KV frame of {size} bytes, its header announces {4 + hlen + nbytes}")
        extra = header.get("extra") or {}
        hashes = tuple(int(h) for h in extra.get("block_hashes") or ()) if extra.get("skip_ok") else ()
        announce = KVAnnounce(str(header["request_id"]), str(header["model"]), int(header["num_tokens"]),
                              dtype, shape, nbytes, hashes)
        return struct.pack(">I", hlen) + raw, announce

    def _receive(self, sock: socket.socket, size: int, prefix: bytes, started: float, announce: KVAnnounce,
                 skip: int) -> dict[str, Any]:
        skip = skip if 0 < skip < announce.num_tokens and len(announce.shape) == 5 else 0
        if skip:
            size -= announce.nbytes // announce.shape[2] * skip
            sock.sendall(json.dumps({"status": 100, "skip_tokens": skip}).encode() + b"\n")
        else:
            sock.sendall(b'{"status": 100}\n')
        buffer = _allocate(size)
        buffer[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        filled = len(prefix)
        view = memoryview(buffer)
        while filled < size:
            n = sock.recv_into(view[filled:], min(size - filled, _RECV_CHUNK))
            if n == 0:
                raise ConnectionError("sender closed mid-frame")
            filled += n
        payload = decode_kv(buffer, skip)
        received = time.perf_counter()
        lease_s = float(payload.extra.get("lease_s", 30.0))
        try:
            lease = self._on_payload(payload, lease_s)
        except TimeoutError as exc:  # not the socket's: the import did not finish in time
            raise KVRefused(504, "KV import timed out") from exc
        # Where the time went: on the wire, and copying into the decode side's KV pool.
        lease.update(wire_s=received - started, import_s=time.perf_counter() - received)
        return {"status": 200, "lease": lease}


def _handler_for(server: KVSocketServer) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            server.serve(self.request)

    return Handler


def _linger(sock: socket.socket, limit: int = _MAX_HEADER + 64) -> None:
    """After a refusal, read what the sender already sent (its header) until it closes: closing on
    unread data resets the connection, and the reset can destroy our answer before it is read."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(1.0)
    while limit > 0:
        chunk = sock.recv(min(limit, 1 << 14))
        if not chunk:
            return
        limit -= len(chunk)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


def push_kv(host: str, port: int, payload: KVPayload, lease_s: float, secret: bytes,
            timeout_s: float = 120.0) -> dict[str, Any]:
    """Blocking push; returns the receiver's lease. Raises KVRefused (401: the secrets differ) or OSError."""
    # A copy: the caller may push the same payload again over HTTP, its size computed without these.
    skip_ok = bool(payload.extra.get("block_hashes"))
    payload = replace(payload, extra={**payload.extra, "lease_s": lease_s, "skip_ok": skip_ok})
    header, *body = encode_kv_chunks(payload)  # any copy to contiguous memory happens here, not mid-send
    size = encoded_size(payload)
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = sock.makefile("rb")
        hello = replies.read(len(_MAGIC) + _NONCE_BYTES)
        if len(hello) != len(_MAGIC) + _NONCE_BYTES or not hello.startswith(_MAGIC):
            raise ConnectionError("not a tetri KV socket (or an older protocol)")
        sock.sendall(struct.pack(">Q", size) + _mac(secret, hello[len(_MAGIC) :], size) + bytes(header))
        go_on = _check(replies.readline(), expect=100)
        skip = int(go_on.get("skip_tokens") or 0)
        for chunk in tensor_chunks(payload.data, skip) if skip else body:
            sock.sendall(chunk)
        reply = _check(replies.readline(), expect=200)
    reply["lease"].setdefault("skipped_tokens", skip)
    return dict(reply["lease"])


def _check(line: bytes, expect: int) -> dict[str, Any]:
    if not line:
        raise ConnectionError("receiver closed without answering")
    reply = json.loads(line)
    if reply.get("status") != expect:
        raise KVRefused(int(reply.get("status", 502)), str(reply.get("error", "refused")))
    return dict(reply)
