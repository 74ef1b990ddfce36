"""A raw TCP channel for KV pushes between workers: one `sendall` of the tensor's memory on the
sending side, `recv_into` one preallocated buffer on the receiving side. On loopback this moves
KV several times faster than an HTTP body, which Python parses chunk by chunk.

Frame: 8-byte big-endian length, then the message of `encode_kv_chunks`; the receiver answers
with one JSON line: {"status": 200, "lease": {...}} or {"status": 4xx/5xx, "error": "..."}.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from backends.engine_api import KVPayload
from kvbridge.native import KVReceiver, encode_kv_chunks, encoded_size

log = logging.getLogger("tetri.kvbridge")
_RECV_CHUNK = 1 << 22
_MAX_FRAME = 1 << 36

# Called on the receiving side with the payload and the lease length; returns the lease as a dict
# or raises KVRefused.
OnPayload = Callable[[KVPayload, float], dict[str, Any]]


class KVRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KVSocketServer:
    def __init__(self, on_payload: OnPayload, host: str = "0.0.0.0", port: int = 0) -> None:
        handler = _handler_for(on_payload)
        self._server = socketserver.ThreadingTCPServer((host, port), handler, bind_and_activate=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kv-socket", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> KVSocketServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(on_payload: OnPayload) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            try:
                (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
                started = time.perf_counter()
                if size > _MAX_FRAME:
                    raise KVRefused(413, f"KV frame of {size} bytes is too large")
                receiver = KVReceiver(size)
                view = memoryview(receiver.buffer)
                while receiver.filled < size:
                    n = sock.recv_into(view[receiver.filled :], min(size - receiver.filled, _RECV_CHUNK))
                    if n == 0:
                        raise ConnectionError("sender closed mid-frame")
                    receiver.filled += n
                payload = receiver.payload()
                received = time.perf_counter()
                lease_s = float(payload.extra.get("lease_s", 30.0))
                lease = on_payload(payload, lease_s)
                # Where the time went: on the wire, and copying into the decode side's KV pool.
                lease.update(wire_s=received - started, import_s=time.perf_counter() - received)
                reply: dict[str, Any] = {"status": 200, "lease": lease}
            except KVRefused as exc:
                reply = {"status": exc.status, "error": str(exc)}
            except (ValueError, KeyError) as exc:
                reply = {"status": 400, "error": f"bad KV payload: {exc}"}
            except ConnectionError as exc:
                log.warning("KV push broke: %s", exc)
                return
            sock.sendall(json.dumps(reply).encode() + b"\n")

    return Handler


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


def push_kv(host: str, port: int, payload: KVPayload, lease_s: float, timeout_s: float = 120.0) -> dict[str, Any]:
    """Blocking push; returns the receiver's lease. Raises KVRefused or OSError."""
    payload.extra = {**payload.extra, "lease_s": lease_s}
    chunks = list(encode_kv_chunks(payload))  # any copy to contiguous memory happens here, not mid-send
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack(">Q", encoded_size(payload)))
        for chunk in chunks:
            sock.sendall(chunk)
        line = sock.makefile("rb").readline()
    if not line:
        raise ConnectionError("receiver closed without answering")
    reply = json.loads(line)
    if reply.get("status") != 200:
        raise KVRefused(int(reply.get("status", 502)), str(reply.get("error", "refused")))
    return dict(reply["lease"])
