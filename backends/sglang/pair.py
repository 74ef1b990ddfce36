"""One SGLang P/D request on the wire (`disaggregate`): one body with a fresh bootstrap room, sent to
the prefill and the decode server at the same time (the prefill waits for the decode's KV
pre-allocation before it computes); SGLang moves the KV itself (mooncake/nixl/mori).

The first token reaches the caller from whichever side shows it first: the prefill's answer
(`output_ids == [t0]`, sent once the KV transfer succeeded) or the decode stream's first chunk
(which starts with the same handoff token). Everything after it comes from the decode stream.
Closing the iterator early aborts the rid on both servers. kvbridge/sglang.py's strategy calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from backends.base import BackendError, GenRequest, HandoffStats, TokenEvent
from backends.common import tag
from backends.http import DataStream, PendingStream
from backends.sglang.client import SGLangBackend
from backends.sglang.wire import ChunkState, new_rid, new_room

log = logging.getLogger("tetri.backends.sglang.pair")


async def disaggregate(
    request: GenRequest, prefill: SGLangBackend, decode: SGLangBackend, stats: HandoffStats
) -> AsyncIterator[TokenEvent]:
    """Run `request` with its prefill on `prefill` and its decode on `decode` (events with
    phase="prefill", then "decode"); fills `stats` (prompt tokens, rid and bootstrap triple, the
    side the first token came from, both sides' meta_info)."""
    await prefill.info()  # cached after the first call: the bootstrap port, unless configured, is in it
    rid, room = new_rid(), new_room()
    body = prefill.build_body(request, rid, stream=True, room=room,
                              bootstrap_host=prefill.bootstrap_host, bootstrap_port=prefill.bootstrap_port)
    payload = orjson.dumps(body)  # one encoding, the same bytes to both servers
    stats.kv_tokens = len(request.prompt_ids)
    stats.extra.update(rid=rid, bootstrap_room=room, bootstrap_host=body["bootstrap_host"],
                       bootstrap_port=body["bootstrap_port"])
    # A slot on each side first: a full pool is BackendBusy before either server sees the room.
    async with prefill.slot(), decode.slot():
        prefill.track(request.request_id, rid)
        decode.track(request.request_id, rid)
        prefill.ledger.start(request)
        prefill.ledger.progress(request.request_id, 0, "prefill")
        decode.ledger.start(request)
        pair = _Pair(request, prefill, decode, rid, stats)
        try:
            async with contextlib.aclosing(pair.relay(payload)) as events:
                async for event in events:
                    yield event
        finally:
            prefill.ledger.finish(request.request_id)
            decode.ledger.finish(request.request_id)
            prefill.untrack(request.request_id, rid)
            decode.untrack(request.request_id, rid)


class _Pair:
    """One P/D request on the wire: both sides sent together (or neither), the first token from
    whichever side shows it first, the rest from the decode stream, both bodies read to their end,
    and both sides aborted unless the decode finished."""

    def __init__(self, request: GenRequest, prefill: SGLangBackend, decode: SGLangBackend, rid: str,
                 stats: HandoffStats) -> None:
        self.request, self.prefill, self.decode, self.rid, self.stats = request, prefill, decode, rid, stats
        self.p_state, self.d_state = ChunkState(), ChunkState()
        self.p_error: BaseException | None = None

    async def _send_both(self, payload: bytes) -> tuple[DataStream, DataStream]:
        """Open both streams: both requests are written first (in one loop pass when kept
        connections are free), then both answers awaited. Whatever goes wrong, a client leaving
        included, both connections are dropped and both sides aborted before the error goes on."""
        sides = (self.prefill, self.decode)
        sent: list[PendingStream] = []
        opened: list[DataStream] = []
        side = sides[0]
        try:
            for side in sides:
                sent.append(await side.send_generate(payload))
            for side, pending in zip(sides, sent, strict=True):
                opened.append(await side.generate_response(pending))
        except BaseException as exc:
            for pending in sent:
                pending.close()  # its connection, opened or not
            await _abort_both(self.prefill, self.decode, self.rid, prefill_finished=False)
            if isinstance(exc, BackendError):
                raise tag(exc, side.instance_id) from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise tag(BackendError(f"{side.instance_id}: {exc!r}", status=502, retryable=True),
                      side.instance_id) from exc
        return opened[0], opened[1]

    async def _read_prefill(self, resp: DataStream) -> None:
        """The prefill's whole answer (one chunk, then [DONE]); its error is kept, not raised."""
        try:
            async with contextlib.aclosing(resp.blocks(sse=True)) as batches:
                async for batch in batches:
                    self.p_state.feed_batch(batch)
                    self.stats.extra["prefill_meta"] = dict(self.p_state.meta)
                    if self.p_state.finish is not None:
                        self.prefill.ledger.finish(self.request.request_id)
        except Exception as exc:  # noqa: BLE001 - judged by the relay
            self.p_error = exc
        finally:
            resp.close()  # a no-op once read to its end; a reader cancelled before it began drops it

    def _prefill_failure(self) -> BackendError | None:
        """Why the prefill cannot deliver the first token (None: it did, or it ended cleanly)."""
        p = self.p_state
        if self.p_error is not None:
            err = self.p_error if isinstance(self.p_error, BackendError) else \
                BackendError(str(self.p_error), status=502, retryable=True)
            return tag(err, self.prefill.instance_id)
        if p.finish in ("error", "abort"):
            return tag(p.failure(f"prefill {self.prefill.instance_id}"), self.prefill.instance_id)
        if p.finish is None:
            return tag(BackendError(f"prefill {self.prefill.instance_id} ended without its token", status=502,
                                    retryable=True), self.prefill.instance_id)
        return None

    async def relay(self, payload: bytes) -> AsyncIterator[TokenEvent]:
        p_resp, d_resp = await self._send_both(payload)
        started = time.perf_counter()
        reader = asyncio.ensure_future(self._read_prefill(p_resp))
        d_chunks = d_resp.blocks(sse=True)  # a burst of chunks is relayed as one event
        pending: asyncio.Future[list[bytes]] | None = None
        first_sent = finished = False
        sent_ids, sent_text = 0, ""
        d = self.d_state
        try:
            while True:
                if not first_sent and not reader.done():
                    # Before the first token: whichever side shows it first.
                    pending = pending or asyncio.ensure_future(anext(d_chunks))
                    await asyncio.wait({pending, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if not pending.done():
                        continue  # the prefill answered first: judged below
                if not first_sent and reader.done() and (pending is None or not pending.done()):
                    p = self.p_state
                    if p.finish == "abort" and p.status is None and self.p_error is None:
                        finished = True
                        yield TokenEvent([], "", "abort", "prefill", p.error)
                        return
                    failure = self._prefill_failure()
                    if failure is not None:
                        raise failure
                    if p.ids:
                        first_sent = True
                        sent_ids, sent_text = 1, p.text
                        self.stats.extra.update(first_token_from="prefill", ttft_s=time.perf_counter() - started)
                        yield TokenEvent(p.ids[:1], p.text, None, "prefill")
                        continue
                try:
                    if pending is not None:
                        fut, pending = pending, None
                        batch = await fut
                    else:
                        batch = await anext(d_chunks)
                except StopAsyncIteration:
                    msg = f"decode {self.decode.instance_id}: stream ended without a finish reason"
                    if not first_sent:
                        raise tag(BackendError(msg, status=502, retryable=True), self.decode.instance_id) from None
                    finished = True
                    yield TokenEvent([], "", "error", "decode", msg, retryable=True)
                    return
                except BackendError as exc:
                    if not first_sent:
                        raise tag(exc, self.decode.instance_id) from None
                    finished = True
                    # a broken decode stream: the request can continue elsewhere (migration)
                    yield TokenEvent([], "", "error", "decode", str(exc), retryable=True)
                    return
                d.feed_batch(batch)
                if d.finish == "error" and not first_sent:
                    raise tag(d.failure(f"decode {self.decode.instance_id}"), self.decode.instance_id)
                if d.finish is None and not d.ids:
                    continue
                events: list[TokenEvent] = []
                if not first_sent and d.ids:
                    first_sent = True
                    self.stats.extra.update(first_token_from="decode", ttft_s=time.perf_counter() - started)
                    # Per-token text is unknown when the chunk carries more than the handoff token:
                    # the text of the whole chunk goes with the first token.
                    events.append(TokenEvent(d.ids[:1], d.text, None, "prefill"))
                    sent_ids, sent_text = 1, d.text
                new_ids = d.ids[sent_ids:]
                if len(d.ids) == 1 and sent_ids == 1:
                    # the engine's own text of the handoff token is the baseline for deltas
                    sent_text = d.text or sent_text
                new_text = d.text[len(sent_text):]
                if new_ids or new_text or d.finish is not None:
                    events.append(TokenEvent(list(new_ids), new_text, d.finish,  # type: ignore[arg-type]
                                             "decode", d.error, retryable=d.retryable_error))
                    sent_ids += len(new_ids)
                    sent_text = d.text if len(d.text) >= len(sent_text) else sent_text
                    self.decode.ledger.progress(self.request.request_id, len(new_ids))
                for event in events:
                    if event.finish_reason is not None:
                        finished = True
                        self.stats.extra["decode_meta"] = dict(d.meta)
                        # The prefill server's radix-cache hit is the prompt's; the decode's otherwise.
                        p_cached = self.p_state.cached_tokens
                        event.cached_tokens = p_cached if p_cached is not None else d.cached_tokens
                    yield event
                if finished:
                    async for _ in d_chunks:  # to the end of the body: the connection is reused
                        pass
                    return
        finally:
            ok = d.finish in ("stop", "length")
            if not ok:
                # client gone, or either side failed: free the room on both servers
                p_done = reader.done() and self.p_state.finish in ("length", "stop")
                await _abort_both(self.prefill, self.decode, self.rid, p_done)
            # Aborted or done, both bodies now end by themselves; waiting is bounded all the same.
            await _settle(reader, pending)
            await d_chunks.aclose()
            d_resp.close()  # as above, for a stream left before its first read


async def _settle(*futures: asyncio.Future[Any] | None, timeout_s: float = 5.0) -> None:
    live = [f for f in futures if f is not None and not f.done()]
    if live:
        _, late = await asyncio.wait(live, timeout=timeout_s)
        for f in late:
            f.cancel()
        if late:
            await asyncio.wait(late)
    for f in futures:
        if f is not None and f.done() and not f.cancelled():
            f.exception()  # retrieved: no "never retrieved" warning


async def _abort_both(prefill: SGLangBackend, decode: SGLangBackend, rid: str, prefill_finished: bool) -> None:
    """Free both sides: the decode's KV and, if the prefill still holds the room, the prefill's."""
    calls = [decode.abort_rids([rid])]
    if not prefill_finished:
        calls.append(prefill.abort_rids([rid]))
    try:
        await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))
    except asyncio.CancelledError:  # cancelled while aborting: the shielded calls still run
        log.info("abort of %s continues in the background", rid)
