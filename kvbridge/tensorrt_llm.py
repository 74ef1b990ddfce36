"""TensorRT-LLM KV handoff (trtllm-serve, context-first, lifecycle protocol v0): a context-only
request to the context server, its first token to the caller, then a generation-only request to
the chosen generation server carrying the context's `disaggregated_params`; the generation server
pulls the KV from the context server itself (NIXL/UCX/Mooncake transceiver).

Cancellation is closing connections: during the context step that aborts it; during generation
closing the stream aborts it. KV the context server holds for a generation request that will not
be sent (the answer ended at `length`, or the caller left at the first token) is pulled at once by
the generation server with a one-token request (`release_context`): v0 has no release call, and
otherwise the blocks stay taken for `kv_transfer_timeout_ms`.

A generation failure before its first token (an HTTP 400, which may be a failed KV transfer, or a
5xx) raises a retryable BackendError naming the generation instance, so the control plane runs
the request again avoiding it (TensorRT-LLM: retry once with a fresh id on another generation
server). With `early_first_token` (the default) the context's first token is relayed before the
generation step, so that retry is a request migration from the first token; without it the
first token waits for the generation's first output (TensorRT-LLM's proxy: TTFT includes the KV
transfer) and the retry is a fresh placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from backends.base import Backend, BackendError, GenRequest, KVHandle, TokenEvent
from backends.common import tag
from backends.tensorrt_llm import TensorRTLLMBackend, new_disagg_request_id
from kvbridge.base import HandoffStats, HandoffStrategy

log = logging.getLogger("tetri.kvbridge.tensorrt_llm")

# How long a departed request's generation may take to pull its KV before it is closed anyway.
_PULL_WAIT_S = 120.0
# KV releases outlive the request that started them; held here so they are not collected midway.
_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


class DisaggregatedParamsStrategy(HandoffStrategy):
    name = "tensorrt-llm-disaggregated-params"

    async def run(
        self, request: GenRequest, prefill: Backend, decode: Backend, stats: HandoffStats
    ) -> AsyncIterator[TokenEvent]:
        if not isinstance(prefill, TensorRTLLMBackend) or not isinstance(decode, TensorRTLLMBackend):
            raise BackendError("DisaggregatedParamsStrategy needs TensorRT-LLM context and generation instances",
                               status=500)
        # A fresh id per attempt: the KV handoff is keyed by it, reusing one corrupts both requests.
        disagg_id = new_disagg_request_id()
        stats.extra["disagg_request_id"] = disagg_id
        started = time.perf_counter()
        try:
            ctx = await prefill.context_step(request, disagg_id)
        except BackendError as exc:
            raise tag(exc, prefill.instance_id) from None
        stats.extra["context_s"] = time.perf_counter() - started
        if ctx.finished:
            stats.extra["generation_step"] = False
            if ctx.kv_pending:
                # `length` at max_tokens 1: the answer is complete, but the context server keeps the
                # KV for a generation server; let it be pulled, off the client's path.
                stats.extra["kv_released"] = True
                _spawn(decode.release_context(request, ctx.kv_handle(request, disagg_id)))
            yield ctx.first
            return
        params = ctx.params or {}
        stats.kv_tokens = len(ctx.prompt_token_ids)
        stats.extra["ctx_request_id"] = params.get("ctx_request_id")
        kv = ctx.kv_handle(request, disagg_id)
        asked = False        # whether the generation request went out (it pulls the KV)
        try:
            if self.early_first_token:
                yield ctx.first
            asked = True
            held = None if self.early_first_token else ctx.first
            async with contextlib.aclosing(self._generation(request, decode, kv, stats, held)) as events:
                async for event in events:
                    yield event
        finally:
            if not asked:
                # The caller left at the first token: nothing will pull the context's KV.
                stats.extra["kv_released"] = True
                _spawn(decode.release_context(request, kv))

    async def _generation(self, request: GenRequest, decode: TensorRTLLMBackend, kv: KVHandle, stats: HandoffStats,
                          held: TokenEvent | None) -> AsyncIterator[TokenEvent]:
        """The generation step's events, `held` (the context's first token, when not relayed yet)
        before them. A failure before the first of them raises, retryable, naming `decode`."""
        gen_started = time.perf_counter()
        events = decode.decode(request, kv)
        # The first output comes once the KV is pulled; it is awaited in a task of its own so a
        # caller leaving meanwhile does not cut the pull short (see below).
        first_step = asyncio.ensure_future(events.__anext__())
        owned = True     # whether `events` is still ours to close
        try:
            try:
                event = await asyncio.shield(first_step)
            except asyncio.CancelledError:
                # The caller left while the generation server pulls the context's KV: an abort now
                # could leave the context holding it for kv_transfer_timeout_ms. Let the pull end
                # (the first output), then close the stream, which aborts the rest.
                owned = False
                _spawn(_close_after_first(first_step, events, decode.instance_id))
                raise
            except StopAsyncIteration:
                raise tag(BackendError(f"{decode.instance_id}: generation stream ended without output", status=502,
                                       retryable=True), decode.instance_id) from None
            except BackendError as exc:
                # The generation server failed before any output: a 400 here may be a failed KV
                # transfer, so any status is worth another generation instance.
                exc.retryable = True
                raise tag(exc, decode.instance_id) from None
            # time from the generation request to its first new token: KV pull + one step
            stats.transfer_s = time.perf_counter() - gen_started
            if held is not None:
                yield held
            yield event
            try:
                async for event in events:
                    yield event
            except BackendError as exc:
                # after its first output the generation step reports failures as events itself
                yield TokenEvent([], "", "error", "decode", str(exc), retryable=exc.retryable)
        finally:
            if owned:
                if not first_step.done():
                    first_step.cancel()
                    with contextlib.suppress(BaseException):
                        await first_step
                await events.aclose()  # type: ignore[attr-defined]  # closing the stream is the abort


async def _close_after_first(first_step: asyncio.Future[TokenEvent], events: AsyncIterator[TokenEvent],
                             instance_id: str) -> None:
    """Wait (bounded) for a generation's first output, i.e. its KV pull, then close its stream."""
    try:
        await asyncio.wait_for(first_step, _PULL_WAIT_S)
    except BaseException as exc:  # noqa: BLE001 - the caller is gone; nothing to report to
        log.info("%s: generation of a departed request ended before its first output: %r", instance_id, exc)
    with contextlib.suppress(BaseException):
        await events.aclose()  # type: ignore[attr-defined]
