"""The wire form of one request's KV (KVPayload), shared by the HTTP push (PUT /kv/{id}) and the
socket channel (kv_socket.py).

Layout: 4-byte big-endian header length, a JSON header (request_id, num_tokens, model, dtype,
shape, extra) padded with spaces so the body starts 64-byte aligned, then the raw tensor bytes in
C order. Both sides avoid copies: the sender streams views of the exported tensor, the receiver
fills one buffer and views it as the tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from backends.engines.api import KVPayload

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
    yield from tensor_chunks(tensor)


def tensor_chunks(tensor: torch.Tensor, skip_tokens: int = 0) -> Iterator[memoryview]:
    """The tensor's bytes in chunks; with `skip_tokens`, those of positions skip_tokens.. only (the
    receiver holds the leading ones in its prefix cache: a copy of the tail is sent)."""
    body = _raw(tensor[:, :, skip_tokens:] if skip_tokens else tensor)
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


def decode_kv(blob: bytes | bytearray | np.ndarray, skip_tokens: int = 0) -> KVPayload:
    """`skip_tokens`: the body holds positions skip_tokens.. only (the header's shape is the whole
    KV's); the payload then says so in `extra["skip_tokens"]`, its `num_tokens` staying the whole."""
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
    extra = header.get("extra", {})
    if skip_tokens:
        if not 0 < skip_tokens < shape[2]:
            raise ValueError(f"cannot skip {skip_tokens} of {shape[2]} KV positions")
        shape = (shape[0], shape[1], shape[2] - skip_tokens, *shape[3:])
        extra = {**extra, "skip_tokens": skip_tokens}
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
        extra=extra,
    )
