"""A protocol-faithful fake SGLang server (co-located, PD prefill or PD decode), after
../shared/reference/sglang.md (sglang 0.5.23 native API).

What it reproduces: `/generate` (JSON and SSE, cumulative or incremental chunks, `[DONE]`), the
meta_info keys and finish reasons (stop/length/abort with status), the error shapes, strict
`sampling_params`, duplicate-rid and missing-room refusals, the PD pairing by bootstrap room (the
decode contacts the prefill's bootstrap address named in the request, pre-allocates, the prefill
computes only after that, then "pushes" the first token), the prefill's one-token
`{"type": "length", "length": 0}` answer, the decode's output that starts with the handoff token,
prefix-matching `/abort_request`, aborts on client disconnect, `/v1/loads`, legacy `/get_load`,
`/metrics`, `/server_info` and `/pd_role_switch`.

Fault knobs (SGLangFakeConfig, changeable while running): a decode that aborts with 503
(retraction without backup), a decode that never pre-allocates (prefill bootstrap timeout), a
connection dropped mid-stream, an HTTP error status on `/generate`, legacy load endpoints.

The bootstrap "server" of a prefill is served on its own HTTP port under `/_fake_bootstrap/*`
(a real one listens on `--disaggregation-bootstrap-port`), so `bootstrap_port` = the HTTP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.fakes import toy_model
from tests.fakes.radix import RadixCache

SAMPLING_KEYS = {
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "ignore_eos",
    "min_new_tokens", "frequency_penalty", "presence_penalty", "repetition_penalty", "n",
    "skip_special_tokens", "no_stop_trim", "stream_interval", "json_schema", "regex", "ebnf", "logit_bias",
    "sampling_seed", "custom_params", "spaces_between_special_tokens",
}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


@dataclass
class SGLangFakeConfig:
    mode: str | None = None                 # None (co-located) | "prefill" | "decode"
    model_path: str = "toy-model"
    version: str = "0.5.23"
    page_size: int = 1
    kv_cache_dtype: str = "auto"
    transfer_backend: str = "mooncake"
    max_total_num_tokens: int = 100_000
    max_running_requests: int = 64
    chunked_prefill_size: int = 8192
    bootstrap_port: int | None = None       # None: this fake's HTTP port (it serves the bootstrap routes)
    enable_role_switch: bool = False
    token_delay_s: float = 0.002
    prefill_delay_s: float = 0.005
    first_chunk_tokens: int = 1             # decode: tokens in its first chunk (handoff token included)
    incremental_streaming: bool = False
    bootstrap_timeout_s: float = 5.0        # SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT
    waiting_timeout_s: float = 5.0          # SGLANG_DISAGGREGATION_WAITING_TIMEOUT
    load_api: str = "v1"                    # "v1": /v1/loads; "legacy": /get_load (<=0.5.20); "metrics"
    enable_metrics: bool = True
    # --- faults ---
    retract_503_after: int | None = None    # decode: abort with status 503 after this many tokens
    disconnect_after: int | None = None     # drop the connection after this many tokens
    never_bootstrap: bool = False           # decode: never pre-allocate (KV full); prefill then times out
    generate_status: int | None = None      # answer /generate with this HTTP error status
    health_status: int = 200


@dataclass
class _Live:
    rid: str
    prompt: list[int]
    stage: str = "waiting"                  # waiting | running
    generated: int = 0
    abort: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Room:
    prealloc: asyncio.Event = field(default_factory=asyncio.Event)
    kv: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    decode_prompt: list[int] | None = None
    decode_rid: str | None = None


class _Abort(Exception):
    def __init__(self, message: str | None, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class SGLangFake:
    def __init__(self, config: SGLangFakeConfig | None = None) -> None:
        self.config = config or SGLangFakeConfig()
        self.live: dict[str, _Live] = {}
        self.rooms: dict[int, _Room] = {}
        self.bodies: list[dict[str, Any]] = []
        self.abort_calls: list[dict[str, Any]] = []
        self.aborted: list[str] = []            # rids aborted (by /abort_request or disconnect)
        self.disconnected: list[str] = []
        self.role_switches: list[dict[str, Any]] = []
        self.finished: list[str] = []
        self.graphs_captured = self.config.mode in (None, "decode")
        self._initial = dataclasses.replace(self.config)
        self._client: aiohttp.ClientSession | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self.radix = RadixCache()
        self.app = self._build()

    def reset(self) -> None:
        """Back to the configuration it started with, records cleared (between tests)."""
        for f in dataclasses.fields(self._initial):
            setattr(self.config, f.name, getattr(self._initial, f.name))
        for records in (self.bodies, self.abort_calls, self.aborted, self.disconnected, self.role_switches,
                        self.finished):
            records.clear()
        self.radix = RadixCache()
        self.rooms.clear()
        self.graphs_captured = self.config.mode in (None, "decode")

    # ---- helpers -------------------------------------------------------------------------
    def _meta(self, rid: str, prompt: list[int], ids: list[int], finish: Any, started: float,
              final: bool, first: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": rid, "finish_reason": finish, "prompt_tokens": len(prompt), "weight_version": "default",
            "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": len(ids),
            "cached_tokens": self.radix.hit(rid, prompt),
        }
        if final:
            meta["e2e_latency"] = time.time() - started
        if first:
            meta["response_sent_to_client_ts"] = time.time()
        return meta

    def _validate(self, body: dict[str, Any]) -> str | None:
        sp = body.get("sampling_params") or {}
        for key in sp:
            if key not in SAMPLING_KEYS:
                return f"unknown field `{key}`, expected one of {', '.join(sorted(SAMPLING_KEYS))}"
        if ("text" in body) == ("input_ids" in body):
            return "Either text or input_ids should be provided."
        rid = body.get("rid")
        if rid is not None and rid in self.live:
            return "Duplicate request ID detected"
        if self.config.mode in ("prefill", "decode") and body.get("bootstrap_room") is None:
            return "Invalid request: Disaggregated request received without bootstrap room id."
        return None

    def _room(self, room: int) -> _Room:
        if room not in self.rooms:
            self.rooms[room] = _Room()
        return self.rooms[room]

    # ---- the request paths -----------------------------------------------------------------
    async def _run(self, body: dict[str, Any], live: _Live, request: Request):
        """Yields (ids_so_far, visible_text, finish_reason_obj or None) per engine step."""
        cfg = self.config
        sp = body.get("sampling_params") or {}
        prompt = live.prompt
        max_new = int(sp.get("max_new_tokens", 128))
        ignore_eos = bool(sp.get("ignore_eos", False))
        stop = sp.get("stop")
        mode = cfg.mode
        room_id = body.get("bootstrap_room")
        if mode == "prefill":
            room = self._room(room_id)
            try:
                await asyncio.wait_for(self._until(room.prealloc.wait(), live), cfg.bootstrap_timeout_s)
            except TimeoutError:
                msg = (f"Prefill bootstrap failed for request rank=0 req.rid='{live.rid}' "
                       f"req.bootstrap_room={room_id} with exception KVTransferError: Request {room_id} timed out "
                       f"after {cfg.bootstrap_timeout_s}s in KVPoll.Bootstrapping")
                if not room.kv.done():
                    room.kv.set_exception(RuntimeError(msg))
                raise _Abort(msg, 500) from None
            except _Abort:
                if not room.kv.done():
                    room.kv.set_exception(RuntimeError("prefill aborted"))
                raise
            if room.decode_prompt != prompt:
                msg = f"Prefill transfer failed for request rank=0 req.rid='{live.rid}': prompt mismatch with decode"
                if not room.kv.done():
                    room.kv.set_exception(RuntimeError(msg))
                raise _Abort(msg, 500)
            live.stage = "running"
            await asyncio.sleep(cfg.prefill_delay_s)
            token = toy_model.first_token(prompt)
            room.kv.set_result(token)
            yield [token], toy_model.detokenize([token]), {"type": "length", "length": 0}
            return
        first = None
        if mode == "decode":
            first = await self._handshake(body, live)
        live.stage = "running"
        steps = toy_model.trajectory(prompt, max_new, ignore_eos, stop, first=first)
        for i, step in enumerate(steps):
            if live.abort.is_set():
                raise _Abort("Aborted by AbortReq.", None)
            if cfg.retract_503_after is not None and len(step.tokens) > cfg.retract_503_after:
                raise _Abort("The request was retracted and the decode retraction backup is disabled "
                             "(--disaggregation-decode-retraction-backup none); retry it", 503)
            if i > 0 or mode != "decode":
                await asyncio.sleep(cfg.token_delay_s)
            live.generated = len(step.tokens)
            finish = None
            if step.finish == "stop":
                finish = {"type": "stop", "matched": step.matched}
            elif step.finish == "length":
                finish = {"type": "length", "length": max_new}
            yield step.tokens, step.text, finish

    async def _until(self, awaitable, live: _Live):
        """Await `awaitable` unless the request is aborted first."""
        task = asyncio.ensure_future(awaitable)
        aborter = asyncio.ensure_future(live.abort.wait())
        try:
            done, _ = await asyncio.wait({task, aborter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborter.cancel()
        if task in done:
            return task.result()
        task.cancel()
        raise _Abort("Aborted by AbortReq.", None)

    async def _handshake(self, body: dict[str, Any], live: _Live) -> int:
        cfg = self.config
        room_id = body["bootstrap_room"]
        if cfg.never_bootstrap:
            try:
                await asyncio.wait_for(self._until(asyncio.Event().wait(), live), cfg.waiting_timeout_s)
            except TimeoutError:
                pass
            raise _Abort(f"Decode transfer failed for request rank=0 decode_req.req.rid='{live.rid}' "
                         f"bootstrap_room={room_id}: KV not received (prealloc never granted)", 500)
        host = body.get("bootstrap_host")
        port = body.get("bootstrap_port") or cfg.bootstrap_port or 8998
        base = f"http://{host}:{port}"
        try:
            client = self._bootstrap_client()
            async with client.post(f"{base}/_fake_bootstrap/prealloc",
                                   json={"room": room_id, "rid": live.rid, "prompt": live.prompt}) as resp:
                if resp.status != 200:
                    raise _Abort(f"Decode handshake failed for request rank=0 decode_req.req.rid='{live.rid}' "
                                 f"bootstrap_room={room_id}: {await resp.text()}", 500)
                await resp.read()
            data = await self._until(self._get_json(client, f"{base}/_fake_bootstrap/kv/{room_id}",
                                                    {"timeout": str(cfg.waiting_timeout_s)}), live)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Abort(f"Decode handshake failed for request rank=0 decode_req.req.rid='{live.rid}' "
                         f"bootstrap_room={room_id}: cannot reach bootstrap server {base}: {exc!r}", 500) from None
        if "error" in data:
            raise _Abort(f"Decode transfer failed for request rank=0 decode_req.req.rid='{live.rid}' "
                         f"bootstrap_room={room_id} with exception KVTransferError: {data['error']}", 500)
        return int(data["first_token"])

    def _bootstrap_client(self) -> aiohttp.ClientSession:
        """One pooled client per event loop for the decode's bootstrap calls (a real decode keeps
        its connections to the prefill's bootstrap server too). aiohttp: httpx's pool scans every
        connection per request, which made this fake slower the more requests it held."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.waiting_timeout_s + 5),
                                                 connector=aiohttp.TCPConnector(limit=0))
            self._client_loop = loop
        return self._client

    @staticmethod
    async def _get_json(client: aiohttp.ClientSession, url: str, params: dict[str, str]) -> dict[str, Any]:
        async with client.get(url, params=params) as resp:
            return await resp.json(content_type=None)

    # ---- the app -------------------------------------------------------------------------
    def _build(self) -> FastAPI:  # noqa: C901 - one route table
        app = FastAPI()
        fake = self

        @app.get("/health")
        @app.get("/health_generate")
        async def health() -> Response:
            return Response(status_code=fake.config.health_status)

        @app.get("/ready")
        async def ready() -> Response:
            return Response(status_code=fake.config.health_status)

        @app.get("/_fake_stats")
        async def stats() -> Response:
            """What a benchmark checks afterwards: the bootstrap rooms this server saw."""
            rooms = [b["bootstrap_room"] for b in fake.bodies if b.get("bootstrap_room") is not None]
            return JSONResponse({"rooms": rooms, "requests": len(fake.bodies), "live": len(fake.live),
                                 "aborted": len(fake.aborted), "finished": len(fake.finished)})

        @app.post("/generate")
        @app.put("/generate")
        async def generate(request: Request) -> Response:
            cfg = fake.config
            body = await request.json()
            fake.bodies.append(body)
            stream = bool(body.get("stream"))
            if cfg.generate_status is not None:
                status = cfg.generate_status
                return JSONResponse({"object": "error", "message": "Service unavailable (fake)", "type": str(status),
                                     "param": None, "code": status}, status_code=status)
            problem = fake._validate(body)
            rid = body.get("rid") or f"{time.time_ns():032x}"
            if problem is not None:
                if problem.startswith("Invalid request"):   # an abort with status 400
                    if stream:
                        return StreamingResponse(fake._sse_abort(rid, body, problem, 400),
                                                 media_type="text/event-stream")
                    return JSONResponse({"error": {"message": problem}}, status_code=400)
                if stream:
                    return StreamingResponse(fake._sse_error(problem), media_type="text/event-stream")
                return JSONResponse({"error": {"message": problem}}, status_code=400)
            prompt = list(body.get("input_ids") or [])
            live = _Live(rid, prompt)
            fake.live[rid] = live
            if stream:
                return StreamingResponse(fake._sse(body, live, request), media_type="text/event-stream")
            return await fake._json(body, live, request)

        @app.post("/abort_request")
        async def abort_request(request: Request) -> Response:
            body = await request.json()
            fake.abort_calls.append(body)
            rid = body.get("rid") or ""
            for live in list(fake.live.values()):
                if body.get("abort_all") or (rid and live.rid.startswith(rid)):
                    live.abort.set()
                    fake.aborted.append(live.rid)
            return Response(status_code=200)

        @app.post("/_fake_bootstrap/prealloc")
        async def prealloc(request: Request) -> Response:
            if fake.config.mode != "prefill" and not fake.config.enable_role_switch:
                return PlainTextResponse("not a prefill bootstrap server", status_code=404)
            data = await request.json()
            room = fake._room(int(data["room"]))
            room.decode_prompt, room.decode_rid = data["prompt"], data["rid"]
            room.prealloc.set()
            return JSONResponse({"ok": True})

        @app.get("/_fake_bootstrap/kv/{room_id}")
        async def kv(room_id: int, timeout: float = 5.0) -> Response:
            room = fake._room(room_id)
            try:
                token = await asyncio.wait_for(asyncio.shield(room.kv), timeout)
            except TimeoutError:
                msg = f"Request {room_id} timed out after {timeout}s in KVPoll.WaitingForInput"
                return JSONResponse({"error": msg})
            except Exception as exc:  # noqa: BLE001
                return JSONResponse({"error": str(exc)})
            return JSONResponse({"first_token": token, "room": room_id})

        @app.get("/v1/loads")
        async def loads() -> Response:
            if fake.config.load_api != "v1" or _version_tuple(fake.config.version) < (0, 5, 20):
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return JSONResponse(fake._loads())

        @app.get("/get_load")
        async def get_load() -> Response:
            if fake.config.load_api != "legacy":
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            item = fake._loads()["loads"][0]
            return JSONResponse([{
                "dp_rank": 0, "num_reqs": item["num_running_reqs"] + item["num_waiting_reqs"],
                "num_waiting_reqs": item["num_waiting_reqs"], "num_tokens": item["num_total_tokens"],
                "num_pending_tokens": item["num_total_tokens"] - item["num_used_tokens"], "ts_tic": time.monotonic(),
            }])

        @app.get("/metrics")
        async def metrics() -> Response:
            if not fake.config.enable_metrics:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            item = fake._loads()["loads"][0]
            engine = fake.config.mode or "unified"
            labels = f'{{engine_type="{engine}",model_name="{fake.config.model_path}",pp_rank="0",tp_rank="0"}}'
            lines = [
                "# HELP sglang:num_running_reqs The number of running requests.",
                "# TYPE sglang:num_running_reqs gauge",
                f"sglang:num_running_reqs{labels} {float(item['num_running_reqs'])}",
                f"sglang:num_queue_reqs{labels} {float(item['num_waiting_reqs'])}",
                f"sglang:num_used_tokens{labels} {float(item['num_used_tokens'])}",
                f"sglang:max_total_num_tokens{labels} {float(item['max_total_num_tokens'])}",
                f"sglang:kv_available_tokens{labels} {float(item['max_total_num_tokens'] - item['num_used_tokens'])}",
                f"sglang:kv_evictable_tokens{labels} 0.0",
                f"sglang:token_usage{labels} {item['token_usage']}",
                f"sglang:page_size{labels} {float(fake.config.page_size)}",
            ]
            return PlainTextResponse("\n".join(lines) + "\n")

        @app.get("/server_info")
        @app.get("/get_server_info")
        async def server_info(request: Request) -> Response:
            cfg = fake.config
            port = request.scope["server"][1]
            return JSONResponse({
                "model_path": cfg.model_path, "served_model_name": cfg.model_path,
                "disaggregation_mode": cfg.mode or "null", "page_size": cfg.page_size,
                "kv_cache_dtype": cfg.kv_cache_dtype, "max_running_requests": cfg.max_running_requests,
                "chunked_prefill_size": cfg.chunked_prefill_size,
                "disaggregation_bootstrap_port": cfg.bootstrap_port or port,
                "disaggregation_transfer_backend": cfg.transfer_backend, "tp_size": 1,
                "enable_pd_role_switch": cfg.enable_role_switch,
                "max_total_num_tokens": cfg.max_total_num_tokens, "max_req_input_len": cfg.max_total_num_tokens - 8,
                "internal_states": [{
                    "last_gen_throughput": 0.0, "disaggregation_mode": cfg.mode or "null",
                    "memory_usage": {"weight": 1.0, "kvcache": 2.0, "token_capacity": cfg.max_total_num_tokens},
                    "decode_cuda_graph_bs": [1, 2, 4, 8] if fake.graphs_captured else None,
                    "decode_cuda_graph_memory_gb": 0.5 if fake.graphs_captured else None,
                }],
                "version": cfg.version, "frontend": "python",
                "launch_command": f"python -m sglang.launch_server --model-path {cfg.model_path}",
            })

        @app.get("/model_info")
        @app.get("/get_model_info")
        async def model_info() -> Response:
            return JSONResponse({"model_path": fake.config.model_path, "is_generation": True,
                                 "disaggregation_mode": fake.config.mode or "null"})

        @app.post("/pd_role_switch")
        async def role_switch(request: Request) -> Response:
            cfg = fake.config
            if _version_tuple(cfg.version) < (0, 5, 21):
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            body = await request.json()
            fake.role_switches.append(body)
            new_role = body.get("new_role")
            old = cfg.mode or "null"

            def answer(ok: bool, message: str, safe: bool = True) -> Response:
                return JSONResponse({"rid": None, "http_worker_ipc": None, "success": ok, "message": message,
                                     "old_role": old, "new_role": new_role, "safe_to_restore": safe},
                                    status_code=200 if ok else 400)

            if not cfg.enable_role_switch:
                return answer(False, "PD role switch is not enabled; launch the server with --enable-pd-role-switch")
            if new_role not in ("prefill", "decode"):
                return answer(False, f"invalid role {new_role!r}")
            if cfg.mode not in ("prefill", "decode"):
                return answer(False, "role switch requires a PD disaggregation mode")
            if cfg.transfer_backend not in ("mooncake", "mooncake_tcp", "mori"):
                return answer(False, f"transfer backend {cfg.transfer_backend} does not support role switch")
            if new_role == cfg.mode:
                return answer(True, "already in target role")
            if fake.live:
                return answer(False, "instance is not idle; drain all requests before switching")
            if new_role == "decode" and not fake.graphs_captured and body.get("decode_cuda_graph_memory_gb") is None:
                return answer(False, "decode_cuda_graph_memory_gb is required when switching to decode on an "
                                     "instance without decode CUDA graphs")
            cfg.mode = new_role
            if new_role == "decode":
                fake.graphs_captured = True
            return answer(True, f"switched from {old} to {new_role}")

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush_cache() -> Response:
            return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. (When there are "
                                     "running or waiting requests, the operation will not be performed.)\n")

        return app

    def _loads(self) -> dict[str, Any]:
        cfg = self.config
        running = [r for r in self.live.values() if r.stage == "running"]
        waiting = [r for r in self.live.values() if r.stage != "running"]
        used = sum(len(r.prompt) + r.generated for r in running)
        total = used + sum(len(r.prompt) for r in waiting)
        mode = cfg.mode or "null"
        return {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "version": cfg.version,
            "accelerator": "fake", "num_accelerators": 1,
            "loads": [{
                "timestamp": time.time(), "dp_rank": 0, "num_running_reqs": len(running),
                "num_waiting_reqs": len(waiting), "num_waiting_uncached_tokens": sum(len(r.prompt) for r in waiting),
                "num_used_tokens": used, "num_total_tokens": total, "num_active_tokens": used,
                "num_prealloc_ready_tokens": 0, "max_total_num_tokens": cfg.max_total_num_tokens,
                "max_running_requests": cfg.max_running_requests, "token_usage": used / cfg.max_total_num_tokens,
                "gen_throughput": 0.0, "cache_hit_rate": 0.0, "utilization": 0.0,
                "total_prefill_uncached_tokens": 0, "total_prefill_busy_us": 0, "decode_moments": None,
                "memory": {"weight_gb": 1.0, "kv_cache_gb": 2.0, "graph_gb": 0.1,
                           "token_capacity": cfg.max_total_num_tokens},
                "disaggregation": {
                    "mode": mode, "prefill_bootstrap_queue_reqs": len(waiting) if mode == "prefill" else 0,
                    "prefill_inflight_queue_reqs": 0,
                    "decode_prealloc_queue_reqs": len(waiting) if mode == "decode" else 0,
                    "decode_transfer_queue_reqs": 0, "decode_retracted_queue_reqs": 0,
                    "kv_transfer_speed_gb_s": 0.0, "kv_transfer_latency_ms": 0.0,
                },
                "queues": {"waiting": len(waiting), "grammar": 0, "paused": 0, "retracted": 0, "prealloc_ready": 0},
            }],
        }

    async def _sse_error(self, message: str):
        err = {"error": {"message": message, "type": "invalid_request_error", "code": 400, "retryable": False}}
        yield f"data: {json.dumps(err)}\n\n"
        yield "data: [DONE]\n\n"

    async def _sse_abort(self, rid: str, body: dict[str, Any], message: str, status: int):
        finish = {"type": "abort", "message": message, "status_code": status, "err_type": None}
        meta = self._meta(rid, list(body.get("input_ids") or []), [], finish, time.time(), True, True)
        yield f"data: {json.dumps({'text': '', 'output_ids': [], 'meta_info': meta})}\n\n"
        yield "data: [DONE]\n\n"

    async def _sse(self, body: dict[str, Any], live: _Live, request: Request):
        cfg = self.config
        started = time.time()
        sent_ids = 0
        sent_text_len = 0
        first = True
        finished = False
        ids: list[int] = []
        text = ""
        try:
            pending = 0
            try:
                async for ids, text, finish in self._run(body, live, request):
                    if cfg.disconnect_after is not None and len(ids) > cfg.disconnect_after:
                        raise ConnectionResetError("fake: connection dropped mid-stream")
                    pending += 1
                    if cfg.mode == "decode" and first and finish is None and len(ids) < cfg.first_chunk_tokens:
                        continue
                    chunk_ids = ids[sent_ids:] if cfg.incremental_streaming else ids
                    chunk_text = text[sent_text_len:] if cfg.incremental_streaming else text
                    meta = self._meta(live.rid, live.prompt, ids, finish, started, finish is not None, first)
                    first = False
                    sent_ids, sent_text_len = len(ids), len(text)
                    yield f"data: {json.dumps({'text': chunk_text, 'output_ids': chunk_ids, 'meta_info': meta})}\n\n"
                    if finish is not None:
                        finished = True
            except _Abort as abort:
                finish = {"type": "abort", "message": abort.message, "status_code": abort.status, "err_type": None}
                meta = self._meta(live.rid, live.prompt, ids, finish, started, True, first)
                out_ids = ids[sent_ids:] if cfg.incremental_streaming else ids
                out_text = text[sent_text_len:] if cfg.incremental_streaming else text
                yield f"data: {json.dumps({'text': out_text, 'output_ids': out_ids, 'meta_info': meta})}\n\n"
                finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                self.disconnected.append(live.rid)
                self.aborted.append(live.rid)
                live.abort.set()
            else:
                self.finished.append(live.rid)
            self.live.pop(live.rid, None)

    async def _json(self, body: dict[str, Any], live: _Live, request: Request) -> Response:
        started = time.time()

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            self.disconnected.append(live.rid)
            self.aborted.append(live.rid)
            live.abort.set()

        watcher = asyncio.create_task(watch())
        ids: list[int] = []
        text = ""
        finish: Any = None
        try:
            try:
                async for step in self._run(body, live, request):
                    ids, text, finish = step
            except _Abort as abort:
                if abort.status is not None and abort.status >= 401:
                    return JSONResponse({"object": "error", "message": abort.message, "type": str(abort.status),
                                         "param": None, "code": abort.status}, status_code=abort.status)
                if abort.status == 400:
                    return JSONResponse({"error": {"message": abort.message}}, status_code=400)
                finish = {"type": "abort", "message": abort.message, "status_code": None, "err_type": None}
            meta = self._meta(live.rid, live.prompt, ids, finish, started, True, True)
            self.finished.append(live.rid)
            return JSONResponse({"text": text, "output_ids": ids, "meta_info": meta})
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
            self.live.pop(live.rid, None)


def create_app(config: SGLangFakeConfig | None = None) -> FastAPI:
    """uvicorn entry: `uvicorn --factory tests.fakes.sglang_fake:create_app`."""
    fake = SGLangFake(config)
    fake.app.state.fake = fake
    return fake.app

