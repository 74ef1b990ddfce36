"""Native KV handoff: the prefill worker pushes one request's KV blocks straight to the decode
worker (PUT /kv/{id}); the decode worker holds them under a lease until POST /decode claims them.

Wire format of a pushed KV: 4-byte big-endian header length, a JSON header
(request_id, num_tokens, model, dtype, shape), then the raw tensor bytes in C order.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch

from backends.base import Backend, GenRequest, Handoff, TokenEvent
from backends.engine_api import KVPayload
from kvbridge.base import HandoffStats, HandoffStrategy

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode_kv(payload: KVPayload) -> bytes:
    tensor: torch.Tensor = payload.data.detach().contiguous().cpu()
    dtype = str(tensor.dtype).removeprefix("torch.")
    header = json.dumps(
        {
            "request_id": payload.request_id,
            "num_tokens": payload.num_tokens,
            "model": payload.model,
            "dtype": dtype,
            "shape": list(tensor.shape),
            "extra": payload.extra,
        }
    ).encode()
    # bfloat16 has no numpy dtype: ship its raw 16-bit pattern.
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return struct.pack(">I", len(header)) + header + raw.numpy().tobytes()


def decode_kv(blob: bytes | bytearray) -> KVPayload:
    if len(blob) < 4:
        raise ValueError("KV payload too short")
    (hlen,) = struct.unpack(">I", blob[:4])
    header: dict[str, Any] = json.loads(bytes(blob[4 : 4 + hlen]))
    dtype = _TORCH_DTYPES.get(header["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported KV dtype {header['dtype']!r}")
    body = memoryview(blob)[4 + hlen :]
    shape = tuple(header["shape"])
    expected = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if len(body) != expected:
        raise ValueError(f"KV body is {len(body)} bytes, header promises {expected}")
    if dtype == torch.bfloat16:
        tensor = torch.frombuffer(bytearray(body), dtype=torch.int16).view(torch.bfloat16)
    else:
        tensor = torch.frombuffer(bytearray(body), dtype=dtype)
    return KVPayload(
        request_id=header["request_id"],
        num_tokens=header["num_tokens"],
        data=tensor.reshape(shape),
        model=header["model"],
        extra=header.get("extra", {}),
    )


class NativePushStrategy(HandoffStrategy):
    """Prefill (which pushes the KV itself), relay the first token at once, then stream the decode."""

    name = "native-push"

    async def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        handoff = Handoff(decode_url=decode.url, decode_instance_id=decode.instance_id, lease_s=self.lease_s)
        started = time.perf_counter()
        result = await prefill.prefill(request, handoff)
        first = result.first
        first.phase = "prefill"
        yield first
        if result.kv is None:
            return
        stats.kv_tokens = result.kv.num_tokens
        stats.kv_bytes = result.kv.nbytes
        stats.transfer_s = result.kv.transfer_s or (time.perf_counter() - started)
        finished = False
        try:
            async for event in decode.decode(request, result.kv):
                event.phase = "decode"
                yield event
                if event.finish_reason is not None:
                    finished = True
        finally:
            if not finished:
                # Client gone or decode failed: free the decode side's KV (the lease or the run).
                await _quiet_abort(decode, request.request_id)


async def _quiet_abort(backend: Backend, request_id: str) -> None:
    try:
        await backend.abort(request_id)
    except Exception:  # noqa: BLE001 - best effort; leases expire on their own
        pass
