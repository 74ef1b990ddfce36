"""TensorRT-LLM KV handoff (trtllm-serve, context-first, lifecycle protocol v0): a context-only
request to the context server, its first token straight to the caller, then a generation-only
request to the chosen generation server carrying the context's `disaggregated_params`; the
generation server pulls the KV from the context server itself (NIXL/UCX/Mooncake transceiver).

Cancellation is closing connections: during the context step that aborts it; between the two
steps nothing is in flight and the context server frees the blocks after its
`kv_transfer_timeout_ms`; during generation closing the stream aborts it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from backends.base import Backend, BackendError, GenRequest, KVHandle, TokenEvent
from backends.sglang import tag
from backends.tensorrt_llm import TensorRTLLMBackend, new_disagg_request_id
from kvbridge.base import HandoffStats, HandoffStrategy


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
        yield ctx.first
        if ctx.finished:
            stats.extra["generation_step"] = False
            return
        params = ctx.params or {}
        stats.kv_tokens = len(ctx.prompt_token_ids)
        stats.extra["ctx_request_id"] = params.get("ctx_request_id")
        kv = KVHandle(request.request_id, len(ctx.prompt_token_ids), ctx.first.token_ids[0],
                      extra={"disaggregated_params": params, "prompt_token_ids": ctx.prompt_token_ids,
                             "first_text": ctx.first.text, "disagg_request_id": disagg_id})
        gen_started = time.perf_counter()
        first_decode = True
        try:
            async with contextlib.aclosing(decode.decode(request, kv)) as events:
                async for event in events:
                    if first_decode:
                        first_decode = False
                        # time from the generation request to its first new token: KV pull + one step
                        stats.transfer_s = time.perf_counter() - gen_started
                    yield event
        except BackendError as exc:
            # the first token is already out: a failed generation step ends the stream with an error
            yield TokenEvent([], "", "error", "decode", str(exc), retryable=exc.retryable)
