"""Native KV handoff: the prefill worker pushes one request's KV blocks straight to the decode
worker (PUT /kv/{id}); the decode worker holds them under a lease until POST /decode claims them.

Wire format of a pushed KV: 4-byte big-endian header length, a JSON header
(request_id, num_tokens, model, dtype, shape) padded with spaces so the body starts 64-byte
aligned, then the raw tensor bytes in C order. Both sides avoid copies: the sender streams views of
the exported tensor, the receiver fills one buffer and views it as the tensor.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import torch

from backends.base import Backend, GenRequest, Handoff, KVHandle, TokenEvent
from backends.engine_api import KVPayload
from kvbridge.base import HandoffStats, HandoffStrategy

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The body starts at a multiple of this, so the receiver can view it as any dtype without a copy.
_ALIGN = 64
_CHUNK = 1 << 20


def _header(payload: KVPayload, tensor: torch.Tensor) -> bytes:
    header = json.dumps(
        {
            "request_id": payload.request_id,
            "num_tokens": payload.num_tokens,
            "model": payload.model,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "extra": payload.extra,
        }
    ).encode()
    padded = -(-(4 + len(header)) // _ALIGN) * _ALIGN - 4
    return struct.pack(">I", padded) + header.ljust(padded)


def _raw(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().contiguous().cpu()
    # bfloat16 has no numpy dtype: ship its raw 16-bit pattern.
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return memoryview(raw.numpy()).cast("B")


def encoded_size(payload: KVPayload) -> int:
    tensor: torch.Tensor = payload.data
    return len(_header(payload, tensor)) + tensor.numel() * tensor.element_size()


def encode_kv_chunks(payload: KVPayload) -> Iterator[memoryview | bytes]:
    """The wire form as a header and zero-copy views of the tensor's memory (for streaming)."""
    tensor: torch.Tensor = payload.data
    yield _header(payload, tensor)
    body = _raw(tensor)
    for offset in range(0, len(body), _CHUNK):
        yield body[offset : offset + _CHUNK]


def encode_kv(payload: KVPayload) -> bytes:
    return b"".join(bytes(chunk) for chunk in encode_kv_chunks(payload))


class KVReceiver:
    """Collects a pushed KV straight into one preallocated buffer, then views it as a tensor."""

    def __init__(self, size: int) -> None:
        self.buffer = np.empty(size, dtype=np.uint8)
        self.filled = 0

    def write(self, chunk: bytes) -> None:
        end = self.filled + len(chunk)
        if end > len(self.buffer):
            raise ValueError("KV body longer than its Content-Length")
        self.buffer[self.filled : end] = np.frombuffer(chunk, dtype=np.uint8)
        self.filled = end

    def payload(self) -> KVPayload:
        if self.filled != len(self.buffer):
            raise ValueError(f"KV body is {self.filled} bytes, Content-Length said {len(self.buffer)}")
        return decode_kv(self.buffer)


def decode_kv(blob: bytes | bytearray | np.ndarray) -> KVPayload:
    buf = blob if isinstance(blob, np.ndarray) else np.frombuffer(bytearray(blob), dtype=np.uint8)
    if len(buf) < 4:
        raise ValueError("KV payload too short")
    (hlen,) = struct.unpack(">I", buf[:4].tobytes())
    if 4 + hlen > len(buf):
        raise ValueError("KV header longer than the payload")
    header: dict[str, Any] = json.loads(buf[4 : 4 + hlen].tobytes())
    dtype = _TORCH_DTYPES.get(header["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported KV dtype {header['dtype']!r}")
    shape = tuple(int(d) for d in header["shape"])
    body = buf[4 + hlen :]
    expected = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if len(body) != expected:
        raise ValueError(f"KV body is {len(body)} bytes, header promises {expected}")
    raw = torch.from_numpy(body)
    tensor = raw.view(torch.int16).view(torch.bfloat16) if dtype == torch.bfloat16 else raw.view(dtype)
    return KVPayload(
        request_id=header["request_id"],
        num_tokens=header["num_tokens"],
        data=tensor.reshape(shape),
        model=header["model"],
        extra=header.get("extra", {}),
    )


class NativePushStrategy(HandoffStrategy):
    """Prefill (which pushes the KV itself), relay the first token, then stream the decode.

    With `early_first_token` the first token is relayed the moment the prefill worker samples it,
    while the worker still pushes the KV (its streamed /prefill); otherwise after the push. If the
    push then fails, the error arrives after the first token and the control plane resumes the
    request from it (request migration)."""

    name = "native-push"

    def __init__(self, lease_s: float = 30.0, early_first_token: bool = True) -> None:
        super().__init__(lease_s)
        self.early_first_token = early_first_token

    async def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        handoff = Handoff(decode_url=decode.url, decode_instance_id=decode.instance_id, lease_s=self.lease_s)
        started = time.perf_counter()
        kv: KVHandle | None = None
        held: TokenEvent | None = None  # the first token, when it must wait for the hand-off
        finished = False
        try:
            async for item in prefill.prefill_stream(request, handoff):
                if isinstance(item, KVHandle):
                    kv = item
                    continue
                item.phase = "prefill"
                if self.early_first_token:
                    yield item
                else:
                    held = item
            if held is not None:
                yield held
            if kv is None:
                finished = True  # finished at its first token: nothing was handed off
                return
            stats.kv_tokens = kv.num_tokens
            stats.kv_bytes = kv.nbytes
            stats.transfer_s = kv.transfer_s or (time.perf_counter() - started)
            async for event in decode.decode(request, kv):
                event.phase = "decode"
                yield event
                if event.finish_reason is not None:
                    finished = True
        finally:
            if not finished:
                # Client gone or a side failed, at any phase (the hand-off included): free the decode
                # side's KV (the lease, a push still landing, or the run) and the prefill's work.
                sides = [decode] if kv is not None else [decode, prefill]
                aborting = asyncio.gather(*(_quiet_abort(b, request.request_id) for b in sides))
                try:
                    await asyncio.shield(aborting)  # a cancelled caller must not cancel the aborts
                except asyncio.CancelledError:
                    pass  # they finish in the background


async def _quiet_abort(backend: Backend, request_id: str) -> None:
    try:
        await backend.abort(request_id)
    except Exception:  # noqa: BLE001 - best effort; leases expire on their own
        pass
