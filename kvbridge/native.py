"""Native KV handoff: the prefill worker pushes one request's KV blocks straight to the decode
worker (PUT /kv/{id} or the socket channel); the decode worker holds them under a lease until
POST /decode claims them. The wire format is backends/engines/kv_codec.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from backends.base import Backend, GenRequest, Handoff, KVHandle, TokenEvent
from backends.worker import WorkerBackend
from kvbridge.base import HandoffStats, HandoffStrategy


class NativePushStrategy(HandoffStrategy):
    """Prefill (which pushes the KV itself), relay the first token, then stream the decode.

    With `early_first_token` the first token is relayed the moment the prefill worker samples it,
    while the worker still pushes the KV (its streamed /prefill); otherwise after the push. If the
    push then fails, the error arrives after the first token and the control plane resumes the
    request from it (request migration)."""

    name = "native-push"

    async def run(  # type: ignore[override]  # the worker adapter's own hand-off calls
        self, request: GenRequest, prefill: WorkerBackend, decode: WorkerBackend, stats: HandoffStats
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
