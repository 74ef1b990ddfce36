"""SGLang KV handoff: one body with a fresh bootstrap room, sent to the prefill and the decode
server at the same time (the prefill waits for the decode's KV pre-allocation before it computes);
SGLang moves the KV itself (mooncake/nixl/mori) from prefill to decode.

The first token reaches the caller from whichever side shows it first: the prefill's answer
(`output_ids == [t0]`, sent once the KV transfer succeeded) or the decode stream's first chunk
(which starts with the same handoff token). Everything after it comes from the decode stream.
Closing the iterator early aborts the rid on both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from backends.base import Backend, BackendError, GenRequest, TokenEvent
from backends.sglang import ChunkState, SGLangBackend, check_pd_pair, new_rid, new_room, tag
from kvbridge.base import HandoffStats, HandoffStrategy

log = logging.getLogger("tetri.kvbridge.sglang")

_END = object()


class BootstrapRoomStrategy(HandoffStrategy):
    name = "sglang-bootstrap-room"

    def __init__(self, lease_s: float = 30.0) -> None:
        super().__init__(lease_s)
        self._checked: set[tuple[str, str]] = set()

    async def check_pair(self, prefill: SGLangBackend, decode: SGLangBackend) -> None:
        """Refuse (409) a pair whose page size or KV dtype differ; checked once per pair."""
        key = (prefill.instance_id, decode.instance_id)
        if key in self._checked:
            return
        p_info, d_info = await asyncio.gather(prefill.info(), decode.info())
        check_pd_pair(p_info, d_info)
        self._checked.add(key)

    async def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        if not isinstance(prefill, SGLangBackend) or not isinstance(decode, SGLangBackend):
            raise BackendError("BootstrapRoomStrategy needs SGLang prefill and decode instances", status=500)
        await self.check_pair(prefill, decode)
        rid, room = new_rid(), new_room()
        body = prefill.build_body(request, rid, stream=True, room=room,
                                  bootstrap_host=prefill.bootstrap_host, bootstrap_port=prefill.bootstrap_port)
        stats.kv_tokens = len(request.prompt_ids)
        stats.extra.update(rid=rid, bootstrap_room=room, bootstrap_host=body["bootstrap_host"],
                           bootstrap_port=body["bootstrap_port"])
        prefill.track(request.request_id, rid)
        decode.track(request.request_id, rid)
        prefill.ledger.start(request)
        prefill.ledger.progress(request.request_id, 0, "prefill")
        decode.ledger.start(request)

        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump(side: str, backend: SGLangBackend) -> None:
            try:
                async with contextlib.aclosing(backend.stream_chunks(body)) as chunks:
                    async for chunk in chunks:
                        await queue.put((side, chunk))
                await queue.put((side, _END))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((side, exc))

        started = time.perf_counter()
        tasks = [asyncio.create_task(pump("P", prefill)), asyncio.create_task(pump("D", decode))]
        p_state, d_state = ChunkState(), ChunkState()
        p_done = False
        first_sent = False
        sent_ids = 0
        sent_text = ""
        finished = False
        # SGLang reports no per-request transfer time or size; stats.transfer_s/kv_bytes stay 0.
        try:
            while True:
                side, item = await queue.get()
                if side == "P":
                    if first_sent or d_state.finish is not None:
                        # the first token is out, so the KV reached the decode: the prefill's own
                        # answer no longer matters
                        p_done = True
                        if not isinstance(item, BaseException) and item is not _END:
                            p_state.feed(item)
                        continue
                    if isinstance(item, BaseException) or item is _END:
                        p_done = True
                        if item is _END and p_state.finish in ("length", "stop"):
                            continue
                        if isinstance(item, BackendError):
                            raise tag(item, prefill.instance_id)
                        msg = str(item) if isinstance(item, BaseException) else \
                            f"prefill {prefill.instance_id} ended without its token"
                        raise tag(BackendError(msg, status=502, retryable=True), prefill.instance_id)
                    p_state.feed(item)
                    stats.extra["prefill_meta"] = dict(p_state.meta)
                    if p_state.finish in ("error", "abort"):
                        if p_state.finish == "abort" and p_state.status is None:
                            finished = True
                            yield TokenEvent([], "", "abort", "prefill", p_state.error)
                            return
                        raise tag(p_state.failure(f"prefill {prefill.instance_id}"), prefill.instance_id)
                    if p_state.finish is not None:
                        prefill.ledger.finish(request.request_id)
                    if not first_sent and p_state.ids:
                        first_sent = True
                        sent_ids, sent_text = 1, p_state.text
                        stats.extra["first_token_from"] = "prefill"
                        stats.extra["ttft_s"] = time.perf_counter() - started
                        yield TokenEvent(p_state.ids[:1], p_state.text, None, "prefill")
                    continue

                # decode side
                if isinstance(item, BaseException) or item is _END:
                    error = item if isinstance(item, BaseException) else None
                    if error is not None and not first_sent and isinstance(error, BackendError):
                        raise tag(error, decode.instance_id)
                    msg = str(error) if error else f"decode {decode.instance_id}: stream ended without a finish reason"
                    if not first_sent:
                        raise tag(BackendError(msg, status=502, retryable=True), decode.instance_id)
                    finished = True
                    # a broken decode stream: the request can continue elsewhere (migration)
                    yield TokenEvent([], "", "error", "decode", msg, retryable=True)
                    return
                d_state.feed(item)
                if d_state.finish == "error" and not first_sent:
                    raise tag(d_state.failure(f"decode {decode.instance_id}"), decode.instance_id)
                if d_state.finish is None and not d_state.ids:
                    continue
                events: list[TokenEvent] = []
                if not first_sent and d_state.ids:
                    first_sent = True
                    stats.extra["first_token_from"] = "decode"
                    stats.extra["ttft_s"] = time.perf_counter() - started
                    # Per-token text is unknown when the chunk carries more than the handoff token:
                    # the text of the whole chunk goes with the first token.
                    events.append(TokenEvent(d_state.ids[:1], d_state.text, None, "prefill"))
                    sent_ids, sent_text = 1, d_state.text
                new_ids = d_state.ids[sent_ids:]
                if len(d_state.ids) == 1 and sent_ids == 1:
                    # the engine's own text of the handoff token is the baseline for deltas
                    sent_text = d_state.text or sent_text
                new_text = d_state.text[len(sent_text):]
                if new_ids or new_text or d_state.finish is not None:
                    events.append(TokenEvent(list(new_ids), new_text, d_state.finish,  # type: ignore[arg-type]
                                             "decode", d_state.error, retryable=d_state.retryable_error))
                    sent_ids += len(new_ids)
                    sent_text = d_state.text if len(d_state.text) >= len(sent_text) else sent_text
                    decode.ledger.progress(request.request_id, len(new_ids))
                for event in events:
                    if event.finish_reason is not None:
                        finished = True
                        stats.extra["decode_meta"] = dict(d_state.meta)
                    yield event
                if finished:
                    return
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            prefill.ledger.finish(request.request_id)
            decode.ledger.finish(request.request_id)
            prefill.untrack(request.request_id, rid)
            decode.untrack(request.request_id, rid)
            if d_state.finish not in ("stop", "length"):
                # client gone, or either side failed: free the room on both servers
                await _abort_both(prefill, decode, rid, p_done and p_state.finish in ("length", "stop"))


async def _abort_both(prefill: SGLangBackend, decode: SGLangBackend, rid: str, prefill_finished: bool) -> None:
    """Free both sides: the decode's KV and, if the prefill still holds the room, the prefill's."""
    calls = [decode.abort_rids([rid])]
    if not prefill_finished:
        calls.append(prefill.abort_rids([rid]))
    try:
        await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))
    except asyncio.CancelledError:  # cancelled while aborting: the shielded calls still run
        log.info("abort of %s continues in the background", rid)
