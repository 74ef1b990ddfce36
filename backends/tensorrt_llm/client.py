"""Adapter for TensorRT-LLM `trtllm-serve` workers (OpenAI `/v1/completions`), co-located or as
context (prefill) and generation (decode) servers of a disaggregated pair.

Wire protocol: ../shared/reference/tensorrt-llm.md (TensorRT-LLM main, 1.2/1.3.0rc era). The
request models reject unknown fields (`extra="forbid"`), so the adapter sends only long-standing
fields and echoes the context server's `disaggregated_params` back unchanged except for
`request_type`.

Disaggregated request (kvbridge.tensorrt_llm.DisaggregatedParamsStrategy):
1. context-only request (non-streaming) with a fresh `disagg_request_id` (a unique int in
   [2^40, 2^63), never reused, also not on retries);
2. its first token (`first_gen_tokens`, text) goes to the client at once; a context step that
   already finished (`stop`, or `length` with max_tokens 1) is the whole answer;
3. generation-only request with `prompt` = the context's `prompt_token_ids` and its
   `disaggregated_params`; the generation server re-emits the first token, which is dropped
   here by token count (usage), text-checked.

KV a context server holds for a generation request that will not come (the answer ended at
`length`, or the client left before the generation step): v0 has no release call, so the
generation server pulls it with a one-token generation-only request whose answer is dropped
(`release_context`); TensorRT-LLM's proxy likewise continues on `length`. Otherwise the context
server would hold the blocks for `kv_transfer_timeout_ms`.

Token ids: `/v1/completions` streams either text (default) or token ids (`detokenize: false`),
never both. In the default text mode the adapter knows each chunk's token count from the
continuous usage stats, so decode events carry the right number of ids, but as -1 placeholders
(the first token's id is real). Set the instance option `detokenize: false` for real ids
without text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx

from backends.base import BackendError, GenRequest, KVHandle, LoadReport, Role, TokenEvent
from backends.common import InflightLedger, RestartRequired
from backends.http import HTTPBackend, engine_timeout, http_error, iter_sse
from backends.tensorrt_llm.wire import (
    AUTH_HEADER,
    PLACEHOLDER_ID,
    ContextResult,
    closing_iter,
    disagg_auth_header,
    first_error,
    is_duplicate,
    map_finish,
)
from backends.tracing import TRACEPARENT

log = logging.getLogger("tetri.backends.tensorrt_llm")

_SHORT = 5.0
_RELEASE_TIMEOUT = httpx.Timeout(_SHORT, read=120.0)   # a KV pull plus one step


class TensorRTLLMBackend(HTTPBackend):
    """One `trtllm-serve` worker.

    Options (InstanceSpec.options): `served_model` (the `model` string of requests; default
    /v1/models' first id, else the instance's model), `auth_key` (the workers'
    `internal_request_auth_key`), `detokenize` (default true, see module doc), `kv_tokens` (KV
    capacity to report until the first `/metrics` sample arrives), `allow_flip` (default true:
    a worker serves context-only and generation-only requests alike, so a flip is ours alone;
    the worker's YAML must then have `disable_overlap_scheduler: true`), `heavy_decode_threshold`,
    `max_context` (the workers' max_seq_len, for the orchestrator's length checks), `api_key`, `timeout_s`,
    `legacy_recheck_s` (how long a worker that refused `disagg_request_id` is taken for a 1.0-era
    build before the next context request offers the field again; default 300).
    """

    kind = "tensorrt-llm"
    health_timeout_s = 10.0

    def __init__(
        self,
        url: str,
        instance_id: str,
        role: Role,
        model: str | None = None,
        *,
        served_model: str | None = None,
        auth_key: str | None = None,
        api_key: str | None = None,
        detokenize: bool = True,
        kv_tokens: int | None = None,
        allow_flip: bool = True,
        heavy_decode_threshold: int = 128,
        metrics_timeout_s: float = 0.5,
        drain_timeout_s: float = 300.0,
        timeout_s: float | None = None,
        max_context: int | None = None,
        legacy_recheck_s: float = 300.0,
        **unknown: Any,
    ) -> None:
        super().__init__(url, instance_id, role, model, timeout=engine_timeout(timeout_s), bearer=api_key)
        self.max_context = max_context
        if unknown:
            log.warning("tensorrt-llm instance %s: ignoring unknown options %s", instance_id, sorted(unknown))
        self.served_model = served_model
        self.auth_key = auth_key
        self.detokenize = detokenize
        self.kv_tokens = kv_tokens
        self.allow_flip = allow_flip
        self.metrics_timeout_s = metrics_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.ledger = InflightLedger(heavy_decode_threshold)
        self.accepting = True
        self._stats: dict[int, dict[str, Any]] = {}   # last iteration stats per attention-DP rank
        self._stats_at = 0.0
        self._info: dict[str, Any] | None = None
        self._open: dict[str, set[httpx.Response]] = {}
        self._context_calls: dict[str, asyncio.Task[bytes]] = {}   # in-flight context requests
        self._aborted: set[str] = set()
        # 1.0-era fallback: when this worker last refused `disagg_request_id` (monotonic), None if
        # it takes it. Per worker and not for good: an upgraded worker gets the field again.
        self.legacy_recheck_s = legacy_recheck_s
        self._legacy_since: float | None = None
        self._version: str | None = None
        self._down = False
        self._warmed = False

    # ---- registration, load (health, close: HTTPBackend) ---------------------------------------
    async def info(self, refresh: bool = False) -> dict[str, Any]:
        if self._info is not None and not refresh:
            return self._info
        info: dict[str, Any] = {"instance_id": self.instance_id, "backend": self.kind}
        try:
            resp = await self._client.get("/v1/models", timeout=_SHORT)
            if resp.status_code == 200:
                data = resp.json().get("data") or []
                if data:
                    info["model"] = data[0].get("id")
            resp = await self._client.get("/version", timeout=_SHORT)
            if resp.status_code == 200:
                info["version"] = resp.json().get("version")
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendError(f"{self.instance_id}: info failed: {exc!r}", status=503, retryable=True) from exc
        if self.served_model is None:
            self.served_model = info.get("model") or self.model
        if self.model is None:
            self.model = info.get("model")
        info["model"] = info.get("model") or self.model
        try:
            await self._poll_metrics()
        except BackendError:
            pass
        kv = self._kv_summary()
        info.update(block_size=kv.get("tokens_per_block"), total_kv_tokens=kv.get("total") or self.kv_tokens)
        if self.max_context:
            info["max_context"] = self.max_context  # the worker's max_seq_len is not on its HTTP API
        version = info.get("version")
        if version is not None and self._version is not None and version != self._version:
            self._forget_legacy(f"version {self._version} -> {version}")
        self._version = version or self._version
        self._info = info
        return info

    async def health(self) -> bool:
        ok = await super().health()
        if ok and self._down:
            # back after being down: possibly restarted on a newer build
            self._forget_legacy("worker came back")
        self._down = not ok
        return ok

    # ---- 1.0-era fallback (no disagg_request_id) --------------------------------------------
    def _offers_disagg_id(self) -> bool:
        """Whether the next context request carries `disagg_request_id`: yes, unless this worker
        refused it less than `legacy_recheck_s` ago (then the next request probes again)."""
        return self._legacy_since is None or time.monotonic() - self._legacy_since >= self.legacy_recheck_s

    def _forget_legacy(self, why: str) -> None:
        if self._legacy_since is not None:
            log.info("%s: %s; offering disagg_request_id again", self.instance_id, why)
            self._legacy_since = None

    async def _poll_metrics(self) -> int:
        """`GET /metrics` drains the iteration stats gathered since the last call: `[]` when idle
        (or without `enable_iter_perf_stats`), so the last sample per rank is kept. Older builds
        wait up to 2 s on an empty queue: a read timeout counts as `[]`. Returns how many new
        samples came."""
        try:
            resp = await self._client.get("/metrics", timeout=httpx.Timeout(_SHORT, read=self.metrics_timeout_s))
        except httpx.ReadTimeout:
            return 0
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.instance_id}: /metrics failed: {exc!r}", status=503, retryable=True) from exc
        if resp.status_code >= 400:
            raise http_error(self.instance_id, resp)
        try:
            items = resp.json()
        except ValueError:
            return 0
        if isinstance(items, dict):
            items = [items]
        fresh = 0
        for item in items or []:
            if isinstance(item, dict) and item.get("kvCacheStats") is not None:
                self._stats[int(item.get("attentionDpRank") or 0)] = item
                self._stats_at = time.time()
                fresh += 1
        return fresh

    async def _warm_up(self) -> None:
        """A worker that has not run an iteration since it started has no stats to drain:
        `GET /health_generate` runs one tiny generation, which produces some."""
        try:
            await self._client.get("/health_generate", timeout=120.0)
        except httpx.HTTPError as exc:
            log.info("%s: /health_generate failed: %r", self.instance_id, exc)

    def _kv_summary(self) -> dict[str, int]:
        free = total = 0
        tpb = 0
        for item in self._stats.values():
            kv = item.get("kvCacheStats") or {}
            tpb = int(kv.get("tokensPerBlock") or tpb or 0)
            free += int(kv.get("freeNumBlocks") or 0) * int(kv.get("tokensPerBlock") or 0)
            total += int(kv.get("maxNumBlocks") or 0) * int(kv.get("tokensPerBlock") or 0)
        return {"free": free, "total": total, "tokens_per_block": tpb}

    async def load(self) -> LoadReport:
        fresh = await self._poll_metrics()
        if not self._stats and not self._warmed:
            self._warmed = True
            await self._warm_up()
            fresh = await self._poll_metrics()
        report = LoadReport(role=self.role, backend=self.kind, model=self.model or "", accepting=self.accepting)
        if self._stats:
            kv = self._kv_summary()
            report.free_kv_tokens, report.total_kv_tokens = kv["free"], kv["total"]
            report.running = sum(int(s.get("numActiveRequests") or 0) for s in self._stats.values())
            report.queued = sum(int(s.get("numQueuedRequests") or 0) for s in self._stats.values())
            report.queued_prompt_tokens = sum(int(s.get("queuedSumPrefillTokens") or 0) for s in self._stats.values())
            report.chunk_size = max(int(s.get("maxNumTokensRuntime") or s.get("maxNumTokensStatic") or 0)
                                    for s in self._stats.values())
            # No iteration since the last poll and nothing of ours in flight: the engine is idle,
            # and the last sample (taken while the last request still held its blocks) is stale.
            idle = fresh == 0 and not len(self.ledger)
            if idle:
                report.free_kv_tokens, report.running, report.queued, report.queued_prompt_tokens = \
                    report.total_kv_tokens, 0, 0, 0
            report.extra = {"tokens_per_block": kv["tokens_per_block"], "stats_age_s": time.time() - self._stats_at,
                            "iter": max(int(s.get("iter") or 0) for s in self._stats.values()), "idle": idle}
        else:
            # no iteration stats at all (enable_iter_perf_stats off, or /health_generate missing)
            report.running = len(self.ledger)
            if self.kv_tokens:
                used = sum(f.prompt_tokens + f.produced for f in self.ledger.flights.values())
                report.total_kv_tokens, report.free_kv_tokens = self.kv_tokens, max(0, self.kv_tokens - used)
            elif self.role == "decode":
                raise BackendError(
                    f"{self.instance_id}: no KV numbers: /metrics has no iteration stats (set "
                    f"enable_iter_perf_stats: true in the worker's YAML, or give the instance a kv_tokens option)",
                    status=503)
            report.extra = {"stats": "none"}
        return self.ledger.fill(report)

    # ---- bodies -----------------------------------------------------------------------------
    def completion_body(self, request: GenRequest, *, stream: bool, prompt: list[int] | None = None,
                        disaggregated_params: dict[str, Any] | None = None) -> dict[str, Any]:
        sp = request.sampling
        body: dict[str, Any] = {
            "model": self.served_model or self.model or "model",
            "prompt": list(prompt if prompt is not None else request.prompt_ids),
            "max_tokens": sp.max_tokens,   # always: GUARANTEED_NO_EVICT admits on prompt + max_tokens
        }
        # Only what the client gave: newer builds default to the model's generation_config.json.
        if sp.temperature is not None:
            body["temperature"] = sp.temperature
        if sp.top_p is not None:
            body["top_p"] = sp.top_p
        body["stream"] = stream
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.ignore_eos:
            body["ignore_eos"] = True
        if not self.detokenize:
            body["detokenize"] = False
        if stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if disaggregated_params is not None:
            body["disaggregated_params"] = disaggregated_params
        return body

    # ---- HTTP with abort-by-closing ---------------------------------------------------------
    async def _open_stream(self, request_id: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        traceparent = TRACEPARENT.get()  # the request's W3C trace context (tracing on): trtllm-serve joins it
        if traceparent is not None:
            headers = {**(headers or {}), "traceparent": traceparent}
        req = self._client.build_request("POST", "/v1/completions", json=body, headers=headers)
        try:
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.instance_id}: /v1/completions failed: {exc!r}", status=503,
                               retryable=True) from exc
        self._open.setdefault(request_id, set()).add(resp)
        if resp.status_code >= 400:
            await resp.aread()
            await self._close(request_id, resp)
            raise http_error(self.instance_id, resp)
        return resp

    async def _close(self, request_id: str, resp: httpx.Response) -> None:
        opened = self._open.get(request_id)
        if opened is not None:
            opened.discard(resp)
            if not opened:
                self._open.pop(request_id, None)
        await resp.aclose()

    async def abort(self, request_id: str) -> None:
        """trtllm-serve has no abort endpoint: closing the connection aborts the request on the
        worker (it polls for disconnects every second). A context request in flight has no
        response to close yet: its call is cancelled, which drops the connection."""
        opened = list(self._open.get(request_id, ()))
        call = self._context_calls.get(request_id)
        if opened or call is not None:
            self._aborted.add(request_id)
        if call is not None:
            call.cancel()
        for resp in opened:
            await resp.aclose()

    # ---- context step -----------------------------------------------------------------------
    async def _context_exchange(self, request_id: str, body: dict[str, Any]) -> bytes:
        resp = await self._open_stream(request_id, body)
        try:
            return await resp.aread()
        except (httpx.HTTPError, httpx.StreamClosed) as exc:
            raise BackendError(f"{self.instance_id}: context request broke: {exc!r}", status=503,
                               retryable=True) from exc
        finally:
            await self._close(request_id, resp)

    async def _context_call(self, request_id: str, body: dict[str, Any]) -> bytes:
        """The context request's answer. It runs as a task of its own that `abort()` can cancel;
        cancelling the caller cancels it too. Either way the connection is dropped before this
        returns, which is how trtllm-serve aborts a request (its KV is never kept)."""
        call = asyncio.ensure_future(self._context_exchange(request_id, body))
        self._context_calls[request_id] = call
        try:
            return await call
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.cancelled() and request_id in self._aborted and not (task and task.cancelling()):
                self._aborted.discard(request_id)
                raise BackendError(f"{self.instance_id}: context request aborted", status=499) from None
            raise
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(call)
            if self._context_calls.get(request_id) is call:
                del self._context_calls[request_id]

    async def context_step(self, request: GenRequest, disagg_request_id: int) -> ContextResult:
        params: dict[str, Any] = {"request_type": "context_only"}
        offered = self._offers_disagg_id()
        if offered:
            params["disagg_request_id"] = disagg_request_id
        body = self.completion_body(request, stream=False, disaggregated_params=params)
        self.ledger.start(request)
        self.ledger.progress(request.request_id, 0, "prefill")
        try:
            try:
                raw = await self._context_call(request.request_id, body)
                if offered:
                    self._forget_legacy("worker took disagg_request_id")
            except BackendError as exc:
                if exc.status != 400 or "disagg_request_id" not in str(exc) or not offered:
                    raise
                # 1.0-era build: no disagg_request_id field; the worker keys the handoff by its own
                # id. Taken as such for legacy_recheck_s, then the field is offered again.
                log.warning("%s: worker refused disagg_request_id (1.0-era build?); using ctx_request_id for "
                            "%.0fs", self.instance_id, self.legacy_recheck_s)
                self._legacy_since = time.monotonic()
                del params["disagg_request_id"]
                raw = await self._context_call(request.request_id, body)
        finally:
            self.ledger.finish(request.request_id)
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"{self.instance_id}: malformed context response: {raw[:300]!r}", status=502) from exc
        params = choice.get("disaggregated_params")
        reason = choice.get("finish_reason")
        text = choice.get("text") or ""
        first_ids = list((params or {}).get("first_gen_tokens") or choice.get("token_ids") or [])
        prompt_ids = data.get("prompt_token_ids") or list(request.prompt_ids)
        if prompt_ids and isinstance(prompt_ids[0], list):
            prompt_ids = prompt_ids[0]
        usage = data.get("usage") or {}
        issued = bool(params and params.get("ctx_request_id") is not None and params.get("first_gen_tokens"))
        if reason == "stop" or (reason == "length" and request.sampling.max_tokens <= 1):
            if not first_ids:
                first_ids = [PLACEHOLDER_ID] * int(usage.get("completion_tokens") or 1)
            # `length`: the worker keeps the KV for a generation server, as for `not_finished`
            # (its proxy continues on both); `stop` is final.
            return ContextResult(TokenEvent(first_ids, text, reason, "prefill"), params, prompt_ids, usage, True,
                                 kv_pending=reason == "length" and issued)
        if reason not in ("not_finished", "length"):
            raise BackendError(f"{self.instance_id}: context step ended with finish_reason {reason!r}", status=502)
        if not issued or not first_ids:
            raise BackendError(f"{self.instance_id}: context response lacks disaggregated_params "
                               f"(is cache_transceiver_config set?)", status=502)
        return ContextResult(TokenEvent(first_ids, text, None, "prefill"), params, prompt_ids, usage, False)

    # ---- generation step --------------------------------------------------------------------
    def _generation_body(self, request: GenRequest, kv: KVHandle, *,
                         stream: bool) -> tuple[dict[str, Any], dict[str, str] | None]:
        """A generation-only request: the context's `disaggregated_params`, unchanged but for
        `request_type`, and its prompt ids; the auth header when a key is set."""
        params = dict(kv.extra["disaggregated_params"])
        params["request_type"] = "generation_only"
        headers = None
        if self.auth_key and (params.get("encoded_opaque_state") is not None
                              or params.get("ctx_info_endpoint") is not None):
            headers = {AUTH_HEADER: disagg_auth_header(self.auth_key, params)}
        body = self.completion_body(request, stream=stream, prompt=kv.extra.get("prompt_token_ids"),
                                    disaggregated_params=params)
        return body, headers

    def decode(self, request: GenRequest, kv: KVHandle) -> AsyncIterator[TokenEvent]:
        body, headers = self._generation_body(request, kv, stream=True)
        skip = list(kv.extra["disaggregated_params"].get("first_gen_tokens") or [kv.first_token_id])
        return self._events(request, body, "decode", skip, kv.extra.get("first_text", ""), headers)

    async def release_context(self, request: GenRequest, kv: KVHandle) -> bool:
        """Free the KV a context server holds for a generation that will not run: v0 has no release
        call, so this worker pulls it with a one-token generation-only request and drops the
        answer. Best effort: on failure the context server frees it after kv_transfer_timeout_ms.
        Returns whether the pull succeeded."""
        short = GenRequest(f"{request.request_id}/release", list(request.prompt_ids),
                           replace(request.sampling, max_tokens=1))
        body, headers = self._generation_body(short, kv, stream=False)
        self.ledger.start(short)
        try:
            resp = await self._client.post("/v1/completions", json=body, headers=headers, timeout=_RELEASE_TIMEOUT)
        except httpx.HTTPError as exc:
            log.info("%s: releasing %s's context KV failed: %r", self.instance_id, request.request_id, exc)
            return False
        finally:
            self.ledger.finish(short.request_id)
        if resp.status_code >= 400:
            log.info("%s: releasing %s's context KV failed: HTTP %d %.200s", self.instance_id,
                     request.request_id, resp.status_code, resp.text)
            return False
        return True

    def generate(self, request: GenRequest) -> AsyncIterator[TokenEvent]:
        return self._events(request, self.completion_body(request, stream=True), "generate")

    async def _events(self, request: GenRequest, body: dict[str, Any], phase: str, skip_ids: list[int] | None = None,
                      skip_text: str = "", headers: dict[str, str] | None = None) -> AsyncIterator[TokenEvent]:
        """Deltas of one streamed completion, without its first tokens when they are `skip_ids`
        (the first token the context step already gave; the generation server re-emits it)."""
        skip_ids = list(skip_ids or [])
        skip_tokens = len(skip_ids)
        rid = request.request_id
        self.ledger.start(request)
        resp = None
        yielded = False

        def fail(message: str, status: int = 502) -> BackendError:
            return BackendError(f"{self.instance_id}: {message}", status=status, retryable=status >= 500)

        try:
            resp = await self._open_stream(rid, body, headers)
            count = 0                 # tokens produced so far by this request (engine's count)
            skip_left = skip_text     # text of the duplicate tokens not yet seen in the stream
            try:
                async for chunk in closing_iter(iter_sse(resp)):
                    error = first_error(chunk)
                    if error is not None:
                        if not yielded:
                            raise fail(error)
                        yield TokenEvent([], "", "error", phase, f"{self.instance_id}: {error}")  # type: ignore[arg-type]
                        return
                    choices = chunk.get("choices") or []
                    if not choices:
                        continue  # the final usage chunk
                    choice = choices[0]
                    piece = choice.get("text") or ""
                    ids = choice.get("token_ids")
                    usage = chunk.get("usage") or {}
                    reason = choice.get("finish_reason")
                    prev = count
                    if usage.get("completion_tokens") is not None:
                        count = max(count, int(usage["completion_tokens"]))
                    elif ids is not None:
                        count += len(ids)
                    elif piece:
                        count += 1
                    n = count - prev
                    drop = min(max(0, skip_tokens - prev), n)
                    if drop and not is_duplicate(ids, piece, skip_ids[prev:prev + drop], skip_left):
                        # this build did not re-emit the context's first token: keep everything
                        log.warning("%s: generation stream does not start with the first token; not dropping",
                                    self.instance_id)
                        skip_tokens, drop, skip_left = 0, 0, ""
                    if drop:
                        if drop == n:
                            piece_out = ""
                            skip_left = skip_left[len(piece):] if skip_left.startswith(piece) else ""
                        else:
                            piece_out = piece[len(skip_left):] if piece.startswith(skip_left) else piece
                            skip_left = ""
                    else:
                        piece_out = piece
                    new_ids = list(ids[drop:]) if ids is not None else [PLACEHOLDER_ID] * (n - drop)
                    finish = map_finish(reason)
                    self.ledger.progress(rid, len(new_ids))
                    if finish == "error" and not yielded:
                        raise fail(f"finish_reason {reason!r}")
                    if new_ids or piece_out or finish:
                        error_msg = f"{self.instance_id}: finish_reason {reason!r}" if finish == "error" else None
                        yielded = True
                        yield TokenEvent(new_ids, piece_out, finish, phase, error_msg)  # type: ignore[arg-type]
                        if finish is not None:
                            return
            except (httpx.HTTPError, httpx.StreamClosed) as exc:
                if rid in self._aborted:
                    self._aborted.discard(rid)
                    yield TokenEvent([], "", "abort", phase, "aborted")  # type: ignore[arg-type]
                    return
                if not yielded:
                    raise fail(f"stream broke: {exc!r}", 503) from exc
                yield TokenEvent([], "", "error", phase, f"{self.instance_id}: stream broke: {exc!r}",  # type: ignore[arg-type]
                                 retryable=True)
                return
            if not yielded:
                raise fail("stream ended without a finish reason")
            yield TokenEvent([], "", "error", phase,  # type: ignore[arg-type]
                             f"{self.instance_id}: stream ended without a finish reason", retryable=True)
        finally:
            self.ledger.finish(rid)
            if resp is not None:
                await self._close(rid, resp)   # closing the connection is TRT-LLM's cancel
            self._aborted.discard(rid)

    # ---- drain and flips --------------------------------------------------------------------
    async def drain(self, accepting: bool = False) -> dict[str, Any]:
        self.accepting = accepting
        return {"accepting": accepting, "inflight": len(self.ledger)}

    async def set_role(self, role: Role) -> dict[str, Any]:
        """A trtllm-serve worker serves context-only, generation-only and plain requests alike,
        so a flip is: stop routing, wait for our in-flight requests on it, then route by the new
        role. Context work needs `disable_overlap_scheduler: true` in the worker's YAML; with
        `allow_flip: false` the instance is drained and RestartRequired raised instead."""
        if role == self.role:
            return {"role": role, "drain_s": 0.0, "flip_s": 0.0}
        old_accepting = self.accepting
        self.accepting = False
        if not self.allow_flip:
            raise RestartRequired(f"{self.instance_id}: allow_flip is off for this trtllm-serve worker; drained, "
                                  f"restart it with the {role} YAML")
        started = time.monotonic()
        while len(self.ledger):
            if time.monotonic() - started > self.drain_timeout_s:
                self.accepting = old_accepting
                raise BackendError(f"{self.instance_id}: still busy after {self.drain_timeout_s:.0f}s", status=409)
            await asyncio.sleep(0.1)
        drain_s = time.monotonic() - started
        self.role = role
        self.accepting = old_accepting
        return {"role": role, "drain_s": drain_s, "flip_s": 0.0}
