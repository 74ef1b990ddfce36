"""Adapter for SGLang servers (native `/generate` API), co-located or PD-disaggregated.

Wire protocol: ../shared/reference/sglang.md (read from sglang 0.5.20-0.5.23 and sglang-router 0.3.2).
Targets sglang >= 0.5.21 (`/v1/loads`, `/pd_role_switch`); 0.5.20 and older work through the
`/get_load` and `/metrics` fallbacks, without in-place role flips.

A disaggregated request is one body (`rid`, `input_ids`, `sampling_params`, `stream` and the
bootstrap triple `bootstrap_host`/`bootstrap_port`/`bootstrap_room`) POSTed to the prefill and the
decode server at the same time: `disaggregate` (pair.py) runs it; `kvbridge.sglang.BootstrapRoomStrategy`
calls it.

Error rule shared with the TensorRT-LLM adapter: an HTTP error status (or a refused connection)
raises `BackendError`; once a stream has started, engine-side failures arrive as a last
`TokenEvent` with `finish_reason` "error" (or "abort" for a plain abort) and `error` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import orjson

from backends.base import BackendError, GenRequest, LoadReport, Role, TokenEvent
from backends.common import InflightLedger, RestartRequired, host_of, parse_prometheus
from backends.http import (
    DataStream,
    HTTPBackend,
    PendingStream,
    PoolLimits,
    engine_timeout,
    error_message,
    http_error,
    parse_sse_payload,
)
from backends.sglang.wire import DEFAULT_BOOTSTRAP_PORT, ChunkState, new_rid, sampling_params

log = logging.getLogger("tetri.backends.sglang")

_SHORT = 5.0


class SGLangBackend(HTTPBackend):
    """One SGLang server (`python -m sglang.launch_server` / `sglang serve`).

    Options (InstanceSpec.options): `bootstrap_host` (address of this prefill as the decode servers
    reach it; default the URL's host), `bootstrap_port` (default: /server_info's
    `disaggregation_bootstrap_port`, else 8998), `seed_field` (sampling-params key for seeds,
    default "sampling_seed"; null to never send seeds), `admin_key` (Bearer token for servers
    started with `--admin-api-key`/`--api-key`), `decode_cuda_graph_memory_gb` and
    `decode_cuda_graph_bs` (for flips to decode), `drain_timeout_s` (default 300),
    `heavy_decode_threshold` (128), `max_context` (default: from /server_info), `timeout_s`.
    """

    kind = "sglang"
    health_timeout_s = 30.0

    def __init__(
        self,
        url: str,
        instance_id: str,
        role: Role,
        model: str | None = None,
        *,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        seed_field: str | None = "sampling_seed",
        admin_key: str | None = None,
        api_key: str | None = None,
        decode_cuda_graph_memory_gb: float | None = None,
        decode_cuda_graph_bs: list[int] | None = None,
        drain_timeout_s: float = 300.0,
        heavy_decode_threshold: int = 128,
        timeout_s: float | None = None,
        max_context: int | None = None,
        pool: PoolLimits | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__(url, instance_id, role, model, timeout=engine_timeout(timeout_s), bearer=admin_key or api_key,
                         pool=pool)
        self.max_context = max_context
        if unknown:
            log.warning("sglang instance %s: ignoring unknown options %s", instance_id, sorted(unknown))
        self.bootstrap_host = bootstrap_host or host_of(self.url)
        self._bootstrap_port = bootstrap_port
        self.seed_field = seed_field
        self.decode_cuda_graph_memory_gb = decode_cuda_graph_memory_gb
        self.decode_cuda_graph_bs = decode_cuda_graph_bs
        self.drain_timeout_s = drain_timeout_s
        self._info: dict[str, Any] | None = None
        self._load_path: str | None = None
        self.accepting = True
        self.ledger = InflightLedger(heavy_decode_threshold)
        self._rids: dict[str, set[str]] = {}

    # ---- registration facts --------------------------------------------------------------
    @property
    def bootstrap_port(self) -> int:
        if self._bootstrap_port is not None:
            return int(self._bootstrap_port)
        if self._info and self._info.get("bootstrap_port") is not None:
            return int(self._info["bootstrap_port"])
        return DEFAULT_BOOTSTRAP_PORT

    async def _get_json(self, *paths: str, timeout: float = _SHORT) -> tuple[str, Any]:
        """The first of `paths` that answers 200 with JSON; 404/405 fall through to the next."""
        last: BackendError | None = None
        for path in paths:
            try:
                resp = await self._control.get(path, timeout=timeout)
            except httpx.HTTPError as exc:
                raise BackendError(f"{self.instance_id}: GET {path} failed: {exc!r}", status=503,
                                   retryable=True) from exc
            if resp.status_code in (404, 405):
                last = http_error(self.instance_id, resp)
                continue
            if resp.status_code >= 400:
                raise http_error(self.instance_id, resp)
            try:
                return path, resp.json()
            except json.JSONDecodeError:
                return path, resp.text
        raise last or BackendError(f"{self.instance_id}: none of {paths} answered", status=502)

    @property
    def known_info(self) -> dict[str, Any] | None:
        """`info()` as last fetched (None before the first call or after a role change)."""
        return self._info

    async def info(self, refresh: bool = False) -> dict[str, Any]:
        """`/server_info` (or the deprecated `/get_server_info`), normalised: model, page_size,
        kv_cache_dtype, total_kv_tokens, chunk_size, disaggregation_mode, bootstrap_port,
        role_switch, version; the raw answer under "raw"."""
        if self._info is not None and not refresh:
            return self._info
        _, raw = await self._get_json("/server_info", "/get_server_info")
        raw = raw if isinstance(raw, dict) else {}
        states = raw.get("internal_states") or [{}]
        state0 = states[0] if isinstance(states, list) and states else {}
        total = raw.get("max_total_num_tokens")
        if total is None:
            total = ((state0.get("memory_usage") or {}).get("token_capacity"))
        page = raw.get("page_size")
        mode = raw.get("disaggregation_mode") or state0.get("disaggregation_mode")
        info = {
            "instance_id": self.instance_id,
            "backend": self.kind,
            "model": raw.get("served_model_name") or raw.get("model_path") or self.model,
            "version": raw.get("version"),
            "page_size": page,
            "block_size": page,
            "kv_cache_dtype": raw.get("kv_cache_dtype"),
            "dtype": raw.get("kv_cache_dtype"),
            "total_kv_tokens": int(total) if total is not None else None,
            "max_running_requests": raw.get("max_running_requests"),
            "chunk_size": raw.get("chunked_prefill_size"),
            "disaggregation_mode": mode,
            "transfer_backend": raw.get("disaggregation_transfer_backend"),
            "bootstrap_port": raw.get("disaggregation_bootstrap_port"),
            "role_switch": bool(raw.get("enable_pd_role_switch")),
            "max_context": self.max_context or raw.get("context_len") or raw.get("context_length")
            or raw.get("max_req_input_len"),
            "raw": raw,
        }
        self._info = info
        if self.model is None and info["model"]:
            self.model = str(info["model"])
        return info

    # ---- load ------------------------------------------------------------------------------
    async def load(self) -> LoadReport:
        paths = [self._load_path] if self._load_path else [
            "/v1/loads?include=core,disagg,queues,memory", "/get_load", "/metrics"]
        last_exc: BackendError | None = None
        for path in paths:
            resp = await self.poll_get(path, _SHORT)
            if resp.status_code in (404, 405) and not self._load_path:
                last_exc = http_error(self.instance_id, resp)
                continue
            if resp.status_code >= 400:
                raise http_error(self.instance_id, resp)
            self._load_path = path
            if path.startswith("/v1/loads"):
                report = self._from_loads(resp.json())
            elif path == "/get_load":
                report = await self._from_get_load(resp.json())
            else:
                report = await self._from_metrics(resp.text)
            report.backend, report.model, report.accepting = self.kind, self.model or "", self.accepting
            if self._info and self._info.get("chunk_size"):
                report.chunk_size = int(self._info["chunk_size"] or 0)
            return self.ledger.fill(report)
        raise last_exc or BackendError(f"{self.instance_id}: no load endpoint", status=502)

    def _server_role(self, mode: str | None) -> Role:
        if mode in ("prefill", "decode"):
            return mode  # type: ignore[return-value]
        if mode in (None, "null", "") and self.role != "colocated" and self._info is not None:
            # the server says it is not disaggregated: trust it over our registration
            if self._info.get("disaggregation_mode") in (None, "null"):
                return "colocated"
        return self.role

    def _from_loads(self, data: dict[str, Any]) -> LoadReport:
        loads = data.get("loads") or []
        running = queued = used_total = capacity = waiting_tokens = 0
        mode = None
        extra: dict[str, Any] = {"version": data.get("version"), "endpoint": "/v1/loads"}
        prealloc = transfer = 0
        for item in loads:
            running += int(item.get("num_running_reqs") or 0)
            queued += int(item.get("num_waiting_reqs") or 0)
            cap = int(item.get("max_total_num_tokens") or 0)
            capacity += cap
            used_total += int(item.get("num_total_tokens") or item.get("num_used_tokens") or 0)
            waiting_tokens += int(item.get("num_waiting_uncached_tokens") or 0)
            dis = item.get("disaggregation") or {}
            mode = dis.get("mode") or mode
            prealloc += int(dis.get("decode_prealloc_queue_reqs") or 0)
            transfer += int(dis.get("decode_transfer_queue_reqs") or 0)
            extra.setdefault("gen_throughput", 0.0)
            extra["gen_throughput"] += float(item.get("gen_throughput") or 0.0)
        if capacity == 0 and self._info and self._info.get("total_kv_tokens"):
            capacity = int(self._info["total_kv_tokens"])
        extra.update(decode_prealloc_queue_reqs=prealloc, decode_transfer_queue_reqs=transfer, dp_ranks=len(loads))
        return LoadReport(
            role=self._server_role(mode),
            running=running,
            queued=queued,
            free_kv_tokens=max(0, capacity - used_total),
            total_kv_tokens=capacity,
            queued_prompt_tokens=waiting_tokens,
            extra=extra,
        )

    async def _from_get_load(self, data: Any) -> LoadReport:
        info = self._info or await self.info()
        items = data if isinstance(data, list) else [data]
        reqs = sum(int(i.get("num_reqs") or 0) for i in items)
        waiting = sum(int(i.get("num_waiting_reqs") or 0) for i in items)
        tokens = sum(int(i.get("num_tokens") or 0) for i in items)
        capacity = int(info.get("total_kv_tokens") or 0)
        return LoadReport(
            role=self._server_role(info.get("disaggregation_mode")),
            running=max(0, reqs - waiting), queued=waiting,
            free_kv_tokens=max(0, capacity - tokens), total_kv_tokens=capacity,
            extra={"endpoint": "/get_load"},
        )

    async def _from_metrics(self, text: str) -> LoadReport:
        info = self._info or await self.info()
        m = parse_prometheus(text, ("sglang:", "sglang_"))
        if not m:
            raise BackendError(f"{self.instance_id}: no sglang metrics (start it with --enable-metrics)", status=502)
        capacity = int(m.get("max_total_num_tokens") or info.get("total_kv_tokens") or 0)
        if "kv_available_tokens" in m:
            free = int(m["kv_available_tokens"] + m.get("kv_evictable_tokens", 0.0))
        else:
            free = capacity - int(m.get("num_used_tokens", 0.0))
        queued = int(m.get("num_queue_reqs", 0.0) + m.get("num_decode_prealloc_queue_reqs", 0.0)
                     + m.get("num_decode_transfer_queue_reqs", 0.0) + m.get("num_prefill_bootstrap_queue_reqs", 0.0))
        return LoadReport(
            role=self._server_role(info.get("disaggregation_mode")),
            running=int(m.get("num_running_reqs", 0.0)), queued=queued,
            free_kv_tokens=max(0, free), total_kv_tokens=capacity,
            extra={"endpoint": "/metrics"},
        )

    # ---- requests --------------------------------------------------------------------------
    def build_body(
        self, request: GenRequest, rid: str, stream: bool = True, room: int | None = None,
        bootstrap_host: str | None = None, bootstrap_port: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "rid": rid,
            "input_ids": list(request.prompt_ids),
            "sampling_params": sampling_params(request.sampling, self.seed_field),
            "stream": stream,
        }
        if room is not None:
            body["bootstrap_host"] = bootstrap_host
            body["bootstrap_port"] = bootstrap_port
            body["bootstrap_room"] = room
        return body

    def track(self, request_id: str, rid: str) -> None:
        self._rids.setdefault(request_id, set()).add(rid)

    def untrack(self, request_id: str, rid: str) -> None:
        rids = self._rids.get(request_id)
        if rids is not None:
            rids.discard(rid)
            if not rids:
                self._rids.pop(request_id, None)

    async def open_generate(self, payload: bytes) -> DataStream:
        """POST an encoded `/generate` body with `stream: true`; the response once its headers are
        in. The caller holds a `slot()` and reads the body with `chunks()`. HTTP errors raise."""
        return await self.generate_response(await self.send_generate(payload))

    async def send_generate(self, payload: bytes) -> PendingStream:
        """`open_generate` in two steps: the request written (this), then `generate_response`."""
        return await self.stream_send("/generate", payload)

    async def generate_response(self, pending: PendingStream) -> DataStream:
        resp = await pending.response()
        if resp.status >= 400:
            raise await resp.error()
        return resp

    async def chunks(self, resp: DataStream) -> AsyncIterator[dict[str, Any]]:
        """The chunks of an opened `/generate` stream, read to the end of the body (the connection
        goes back to the pool); a broken stream raises a retryable BackendError."""
        async with contextlib.aclosing(resp.blocks(sse=True)) as batches:
            async for batch in batches:
                for payload in batch:
                    chunk = parse_sse_payload(payload)
                    if chunk is not None:
                        yield chunk

    async def stream_chunks(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Raw chunks of one `/generate` call (SSE when body["stream"], else the one JSON body)."""
        async with self.slot():
            if body.get("stream"):
                resp = await self.open_generate(orjson.dumps(body))
                async with contextlib.aclosing(self.chunks(resp)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            try:
                resp = await self._client.post("/generate", json=body)
            except httpx.HTTPError as exc:
                raise BackendError(f"{self.instance_id}: /generate failed: {exc!r}", status=503,
                                   retryable=True) from exc
            if resp.status_code >= 400:
                raise http_error(self.instance_id, resp)
            data = resp.json()
            yield data[0] if isinstance(data, list) else data

    async def _events(self, request: GenRequest, body: dict[str, Any], phase: str,
                      skip_tokens: int = 0, skip_text: str = "") -> AsyncIterator[TokenEvent]:
        """TokenEvents (deltas) of one `/generate` call, leaving out its first `skip_tokens`
        tokens (and their text, `skip_text` until the engine's own text for them is seen).

        A failure before anything was yielded raises BackendError (so the control plane can place
        the request elsewhere); after that it is a last event with finish_reason "error"."""
        state = ChunkState()
        sent_ids, sent_text = skip_tokens, skip_text
        yielded = False
        try:
            async with contextlib.aclosing(self.stream_chunks(body)) as chunks:
                async for chunk in chunks:
                    state.feed(chunk)
                    if state.finish == "error" and not yielded:
                        raise state.failure(self.instance_id)
                    if len(state.ids) <= skip_tokens and state.finish is None:
                        sent_text = state.text or sent_text
                        continue
                    new_ids = state.ids[sent_ids:]
                    new_text = state.text[len(sent_text):]
                    if new_ids or new_text or state.finish:
                        sent_ids += len(new_ids)
                        sent_text = state.text if len(state.text) >= len(sent_text) else sent_text
                        self.ledger.progress(request.request_id, len(new_ids), phase)
                        yielded = True
                        yield TokenEvent(list(new_ids), new_text, state.finish, phase, state.error,  # type: ignore[arg-type]
                                         retryable=state.retryable_error,
                                         cached_tokens=state.cached_tokens if state.finish else None)
                    if state.finish is not None:
                        # Read the body to its end so the connection is reused, then stop.
                        async for _ in chunks:
                            pass
                        return
        except BackendError as exc:
            if not yielded:
                raise
            yield TokenEvent([], "", "error", phase, str(exc), retryable=exc.retryable)  # type: ignore[arg-type]
            return
        message = f"{self.instance_id}: stream ended without a finish reason"
        if not yielded:
            raise BackendError(message, status=502, retryable=True)
        yield TokenEvent([], "", "error", phase, message, retryable=True)  # type: ignore[arg-type]

    async def _tracked_events(self, request: GenRequest, rid: str, body: dict[str, Any], phase: str,
                              **skip: Any) -> AsyncIterator[TokenEvent]:
        """`_events` of one streamed call, in the ledger and tracked for `abort` while it runs; a
        stream left before its finish (client gone, error) aborts the rid on the server."""
        self.track(request.request_id, rid)
        self.ledger.start(request)
        finished = False
        try:
            async with contextlib.aclosing(self._events(request, body, phase, **skip)) as events:
                async for event in events:
                    finished = event.finish_reason is not None
                    yield event
        finally:
            self.ledger.finish(request.request_id)
            self.untrack(request.request_id, rid)
            if not finished:
                await self.abort_rids([rid])

    async def generate(self, request: GenRequest) -> AsyncIterator[TokenEvent]:
        """Co-located: one streamed `/generate`."""
        rid = new_rid()
        events = self._tracked_events(request, rid, self.build_body(request, rid), "generate")
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def abort_rids(self, rids: Iterable[str]) -> None:
        for rid in rids:
            try:
                await self._control.post("/abort_request", json={"rid": rid}, timeout=_SHORT)
            except httpx.HTTPError as exc:
                log.info("%s: abort %s failed: %r", self.instance_id, rid, exc)

    async def abort(self, request_id: str) -> None:
        """`POST /abort_request {"rid"}` for every rid this adapter used for the request."""
        rids = list(self._rids.get(request_id, ()))
        if not rids:
            # Never send an untracked id: SGLang matches rids by prefix and could abort another request.
            log.info("%s: abort of %s: nothing in flight here", self.instance_id, request_id)
            return
        await self.abort_rids(rids)

    # ---- drain and role flips --------------------------------------------------------------
    async def drain(self, accepting: bool = False) -> dict[str, Any]:
        """SGLang has no drain endpoint: we stop routing here (accepting=False in our load
        report) and the control plane stops sending; in-flight requests run to completion."""
        self.accepting = accepting
        return {"accepting": accepting, "inflight": len(self.ledger)}

    async def wait_idle(self, timeout_s: float) -> float:
        start = time.monotonic()
        while True:
            report = await self.load()
            extra = report.extra
            busy = report.running + report.queued + int(extra.get("decode_prealloc_queue_reqs", 0)) \
                + int(extra.get("decode_transfer_queue_reqs", 0)) + len(self.ledger)
            if busy == 0:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise BackendError(f"{self.instance_id}: still busy after {timeout_s:.0f}s of draining", status=409)
            await asyncio.sleep(0.2)

    async def set_role(self, role: Role) -> dict[str, Any]:
        """Flip prefill<->decode in place through `POST /pd_role_switch` (sglang >= 0.5.21,
        `--enable-pd-role-switch`, mooncake or mori transfer). Anything else: the instance is
        left drained and RestartRequired is raised (restart it with the new
        `--disaggregation-mode`)."""
        if role == self.role:
            return {"role": role, "drain_s": 0.0, "flip_s": 0.0, "message": "already in target role"}
        old_accepting = self.accepting
        self.accepting = False
        info = await self.info(refresh=True)
        if role == "colocated" or self.role == "colocated" or info.get("disaggregation_mode") in (None, "null"):
            raise RestartRequired(
                f"{self.instance_id}: SGLang cannot switch between co-located and disaggregated serving "
                f"at runtime; drained, restart it with the new --disaggregation-mode")
        drain_s = await self.wait_idle(self.drain_timeout_s)
        body: dict[str, Any] = {"new_role": role}
        if role == "decode":
            body["decode_cuda_graph_memory_gb"] = self.decode_cuda_graph_memory_gb
            body["decode_cuda_graph_bs"] = self.decode_cuda_graph_bs
        started = time.monotonic()
        try:
            resp = await self._control.post("/pd_role_switch", json=body, timeout=600.0)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.instance_id}: role switch failed: {exc!r}", status=503) from exc
        flip_s = time.monotonic() - started
        if resp.status_code in (404, 405):
            raise RestartRequired(
                f"{self.instance_id}: this SGLang server has no /pd_role_switch (needs sglang >= 0.5.21); "
                f"drained, restart it with --disaggregation-mode {role}")
        try:
            data = resp.json()
        except json.JSONDecodeError:
            data = {"success": False, "message": resp.text[:300]}
        if resp.status_code == 200 and data.get("success", True):
            self.role = role
            self.accepting = old_accepting
            self._info = None
            return {"role": role, "old_role": data.get("old_role"), "drain_s": drain_s, "flip_s": flip_s,
                    "message": data.get("message", "")}
        message = str(data.get("message") or error_message(resp))
        if data.get("safe_to_restore"):
            self.accepting = old_accepting
            if "not enabled" in message or "not support" in message or "does not support" in message:
                raise RestartRequired(f"{self.instance_id}: in-place role switch unavailable ({message}); "
                                      f"restart it with --disaggregation-mode {role}")
            raise BackendError(f"{self.instance_id}: role switch refused: {message}", status=409)
        raise RestartRequired(f"{self.instance_id}: role switch failed and left the server unusable: {message}",
                              status=503)
