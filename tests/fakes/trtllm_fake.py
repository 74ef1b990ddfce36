"""A protocol-faithful fake `trtllm-serve` worker, after ../shared/reference/tensorrt-llm.md.

What it reproduces: `/v1/completions` with strict request validation (`extra="forbid"`: unknown
fields and `stream_options` without `stream` are a 400 `{"error": "<pydantic message>"}`),
context-only requests (`finish_reason: "not_finished"`, `disaggregated_params` with
`first_gen_tokens`, `ctx_request_id`, `encoded_opaque_state`, echoed `disagg_request_id`,
top-level `prompt_token_ids`; `stop` or `length` when the first token already ends it),
generation-only requests that pull the KV from the context worker named in
`encoded_opaque_state` (over HTTP, `/_fake_transceiver/pull`) and re-emit the first token as their
own first output, SSE chunks with every key present (`model_dump`), continuous and final usage
chunks, `[DONE]`; handler errors as 400 `{"object": "error", ...}`, in-stream
`data: {"error": ...}`; aborts on client disconnect; context KV (after `not_finished`, and after
`length`, on which TensorRT-LLM's proxy continues too) held until pulled or until
`kv_transfer_timeout_ms`; `GET /metrics` iteration stats drained on read (`[]` when idle or
without `enable_iter_perf_stats`); `/health`, `/v1/models`, `/version`, `/server_info`.

Fake strictness beyond the engine (to catch adapter bugs): a `disagg_request_id` below 2^40 or one
already in flight is refused; a generation request whose `disaggregated_params` differ from what
the context worker issued (apart from `request_type`, `schedule_style`, `ctx_usage`) fails its
KV transfer. The request schema it validates against is tests/fakes/trtllm_wire.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from tests.fakes import toy_model
from tests.fakes.trtllm_wire import CompletionRequest, CompletionRequestV1, DisaggregatedParamsV1


@dataclass
class TRTFakeConfig:
    model: str = "toy-model"
    version: str = "1.3.0rc5"
    newest_fields: bool = True              # False: 1.0-era DisaggregatedParams (no disagg_request_id)
    tokens_per_block: int = 32
    max_num_blocks: int = 4096
    max_num_tokens: int = 8192
    max_batch_size: int = 64
    enable_iter_perf_stats: bool = True
    kv_transfer_timeout_ms: int | None = 60_000
    context_delay_s: float = 0.005
    token_delay_s: float = 0.002
    first_chunk_tokens: int = 1             # generation: tokens in its first chunk (duplicate included)
    reemit_first_token: bool = True         # False: a (hypothetical) build whose output omits first_gen_tokens
    has_transceiver: bool = True
    overlap_scheduler: bool = False         # True on a context worker: context-only requests fail
    auth_key: str | None = None             # internal_request_auth_key
    metrics_empty_wait_s: float = 0.0       # older builds wait (up to 2 s) on an empty stats queue
    # --- faults ---
    stream_error_after: int | None = None   # emit data: {"error": ...} after this many tokens
    disconnect_after: int | None = None     # drop the connection after this many tokens
    transfer_fail: bool = False             # generation: the KV pull fails
    # generation: time before the KV pull completes; a client gone by then aborts the request and
    # the context keeps the KV (until kv_transfer_timeout_ms)
    transfer_delay_s: float = 0.0
    # generation-only requests answered with this HTTP status before anything runs: 400 is the
    # worker's handler error shape; a 5xx is what a dying server or a proxy in front of it gives
    generation_error_status: int | None = None
    health_status: int = 200


@dataclass
class _Pending:
    prompt: list[int]
    params: dict[str, Any]
    blocks: int
    deadline: float | None


@dataclass
class _Running:
    rid: int
    prompt: list[int]
    blocks: int
    generated: int = 0
    phase: str = "context"


@dataclass
class TRTFake:
    config: TRTFakeConfig = field(default_factory=TRTFakeConfig)

    def __post_init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.pending: dict[int, _Pending] = {}          # context KV waiting to be pulled
        self.running: dict[int, _Running] = {}
        self.aborted: list[int] = []                    # request ids aborted on disconnect
        self.expired: list[int] = []                    # context KV freed by kv_transfer_timeout_ms
        self.pulled: list[int] = []
        self.finished: list[int] = []
        self.stats: list[dict[str, Any]] = []
        self.health_generations = 0
        self._iter = 0
        self._local_ids = itertools.count(1)            # worker-local ids live below 2^40
        self._initial = dataclasses.replace(self.config)
        self.app = self._build()

    def reset(self) -> None:
        """Back to the configuration it started with, records cleared (between tests)."""
        for f in dataclasses.fields(self._initial):
            setattr(self.config, f.name, getattr(self._initial, f.name))
        for records in (self.bodies, self.headers, self.aborted, self.expired, self.pulled, self.finished):
            records.clear()
        self.pending.clear()

    # ---- accounting ---------------------------------------------------------------------------
    def used_blocks(self) -> int:
        return sum(p.blocks for p in self.pending.values()) + sum(r.blocks for r in self.running.values())

    def _blocks(self, tokens: int) -> int:
        return math.ceil(tokens / self.config.tokens_per_block)

    def _record_iteration(self, new: int = 0, completed: int = 0) -> None:
        if not self.config.enable_iter_perf_stats:
            return
        cfg = self.config
        self._iter += 1
        used = self.used_blocks()
        ctx = [r for r in self.running.values() if r.phase == "context"]
        gen = [r for r in self.running.values() if r.phase == "generation"]
        self.stats.append({
            "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"), "iter": self._iter, "iterLatencyMS": 1.0,
            "newActiveRequestsQueueLatencyMS": 0.01, "numNewActiveRequests": new,
            "numActiveRequests": len(self.running), "numQueuedRequests": 0, "numCompletedRequests": completed,
            "maxNumActiveRequests": cfg.max_batch_size, "maxBatchSizeStatic": cfg.max_batch_size,
            "maxBatchSizeTunerRecommended": 0, "maxBatchSizeRuntime": cfg.max_batch_size,
            "maxNumTokensStatic": cfg.max_num_tokens, "maxNumTokensTunerRecommended": 0,
            "maxNumTokensRuntime": cfg.max_num_tokens, "gpuMemUsage": 1 << 30, "cpuMemUsage": 0,
            "pinnedMemUsage": 0,
            "kvCacheStats": {"maxNumBlocks": cfg.max_num_blocks, "freeNumBlocks": cfg.max_num_blocks - used,
                             "usedNumBlocks": used, "tokensPerBlock": cfg.tokens_per_block,
                             "allocTotalBlocks": used, "allocNewBlocks": 0, "reusedBlocks": 0,
                             "missedBlocks": 0, "cacheHitRate": 0.0},
            "staticBatchingStats": {"numScheduledRequests": 0, "numContextRequests": 0, "numCtxTokens": 0,
                                    "numGenTokens": 0, "emptyGenSlots": 0},
            "inflightBatchingStats": {"numScheduledRequests": len(self.running), "numContextRequests": len(ctx),
                                      "numGenRequests": len(gen), "numPausedRequests": 0,
                                      "numCtxTokens": sum(len(r.prompt) for r in ctx), "microBatchId": 0,
                                      "avgNumDecodedTokensPerIter": 1.0},
            "specDecodingStats": None, "attentionDpRank": 0,
        })

    def _sweep(self) -> None:
        now = time.monotonic()
        for rid, pending in list(self.pending.items()):
            if pending.deadline is not None and now > pending.deadline:
                del self.pending[rid]
                self.expired.append(rid)

    # ---- responses -------------------------------------------------------------------------------
    @staticmethod
    def _error(message: str, status: int = 400, kind: str = "BadRequestError") -> JSONResponse:
        return JSONResponse({"object": "error", "message": message, "type": kind, "param": None, "code": status},
                            status_code=status)

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": 0}}

    def _choice(self, text: str, ids: list[int], finish: str | None, stop_reason: Any, detok: bool,
                params: dict[str, Any] | None = None, stream: bool = False) -> dict[str, Any]:
        choice = {"index": 0, "text": text if detok else "", "token_ids": None if detok else ids,
                  "logprobs": None}
        if not stream:
            choice["context_logits"] = None
        choice.update(finish_reason=finish, stop_reason=stop_reason)
        if not stream:
            choice["disaggregated_params"] = params
        choice["avg_decoded_tokens_per_iter"] = None
        return choice

    # ---- app -------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:  # noqa: C901
        fake = self

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            async def sweeper() -> None:
                while True:
                    fake._sweep()
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(sweeper())
            yield
            task.cancel()

        app = FastAPI(lifespan=lifespan)

        @app.get("/health")
        async def health() -> Response:
            if fake.config.health_status != 200:
                return PlainTextResponse("LLM is unavailable. Please check the server logs for more details.",
                                         status_code=fake.config.health_status)
            return Response(status_code=200)

        @app.get("/health_generate")
        async def health_generate() -> Response:
            fake.health_generations += 1
            fake._record_iteration(new=1)      # a real one-token generation runs iterations
            fake._record_iteration(completed=1)
            return PlainTextResponse("Generation health check OK")

        @app.get("/version")
        async def version() -> Response:
            return JSONResponse({"version": fake.config.version})

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [{"id": fake.config.model, "object": "model",
                                                             "created": int(time.time()),
                                                             "owned_by": "tensorrt_llm"}]})

        @app.get("/server_info")
        async def server_info() -> Response:
            return JSONResponse({"disaggregated_params": {}})

        @app.get("/perf_metrics")
        async def perf_metrics() -> Response:
            return JSONResponse([])

        @app.get("/metrics")
        async def metrics() -> Response:
            fake._sweep()
            if not fake.stats and fake.config.metrics_empty_wait_s:
                await asyncio.sleep(fake.config.metrics_empty_wait_s)
            out, fake.stats = fake.stats, []
            return JSONResponse(out)

        @app.post("/_fake_transceiver/pull")
        async def pull(request: Request) -> Response:
            body = await request.json()
            ctx_id = int(body["ctx_request_id"])
            pending = fake.pending.get(ctx_id)
            if pending is None:
                return JSONResponse({"ok": False, "error": f"context request {ctx_id} has no KV to send "
                                                           f"(expired after kv_transfer_timeout_ms?)"})
            issued = {k: v for k, v in pending.params.items() if k not in ("request_type", "schedule_style",
                                                                             "ctx_usage")}
            got = {k: v for k, v in body["params"].items() if k not in ("request_type", "schedule_style",
                                                                          "ctx_usage")}
            if issued != got:
                return JSONResponse({"ok": False, "error": f"disaggregated_params changed in flight: "
                                                           f"issued {issued}, got {got}"})
            if body["prompt"] != pending.prompt:
                return JSONResponse({"ok": False, "error": "prompt differs from the context request's"})
            del fake.pending[ctx_id]
            fake.pulled.append(ctx_id)
            return JSONResponse({"ok": True, "first_gen_tokens": pending.params["first_gen_tokens"]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            cfg = fake.config
            try:
                raw = await request.json()
            except ValueError:
                return JSONResponse({"error": "invalid JSON body"}, status_code=400)
            fake.bodies.append(raw)
            fake.headers.append(dict(request.headers))
            model = CompletionRequest if cfg.newest_fields else CompletionRequestV1
            try:
                req = model.model_validate(raw)
            except ValidationError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            prompt = req.prompt
            if isinstance(prompt, str):
                prompt = [ord(c) % toy_model.VOCAB for c in prompt]
            elif prompt and isinstance(prompt[0], list):
                return fake._error("multi-prompt requests are not supported by this fake")
            prompt = [int(t) for t in prompt]
            dp = req.disaggregated_params
            if dp is not None and not cfg.has_transceiver:
                return fake._error("kv_cache_transceiver is disabled, please set 'cache_transceiver_config: "
                                   "backend:<backend_type>'")
            if dp is not None and dp.request_type == "context_only":
                return await fake._context(req, prompt, request)
            if dp is not None and dp.request_type == "generation_only":
                return await fake._generation(req, prompt, request)
            if dp is not None:
                return fake._error(f"Unknown request_type {dp.request_type}")
            rid = next(fake._local_ids)
            steps = toy_model.trajectory(prompt, req.max_tokens or 16, req.ignore_eos, req.stop)
            return await fake._respond(req, rid, prompt, steps, request, skip=0)

        return app

    async def _watch_disconnect(self, request: Request, rid: int, done: asyncio.Event) -> None:
        while not done.is_set():
            if await request.is_disconnected():
                self.aborted.append(rid)
                return
            await asyncio.sleep(0.05)

    async def _context(self, req: CompletionRequest, prompt: list[int], request: Request) -> Response:
        cfg = self.config
        if cfg.overlap_scheduler:
            return self._error("Context only requests are not supported in pytorch backend when overlap is enabled.")
        dp = req.disaggregated_params
        disagg_id = getattr(dp, "disagg_request_id", None)
        if disagg_id is not None:
            if disagg_id < 1 << 40:
                return self._error(f"disagg_request_id {disagg_id} collides with worker-local ids (< 2^40)")
            if disagg_id in self.pending or disagg_id in self.running:
                return self._error(f"duplicate disagg_request_id {disagg_id}")
            ctx_id = disagg_id
        else:
            ctx_id = next(self._local_ids)
        running = _Running(ctx_id, prompt, self._blocks(len(prompt)))
        self.running[ctx_id] = running
        self._record_iteration(new=1)
        done = asyncio.Event()
        watcher = asyncio.create_task(self._watch_disconnect(request, ctx_id, done))
        try:
            await asyncio.sleep(cfg.context_delay_s)
            if ctx_id in self.aborted:
                return self._error("request aborted")
        finally:
            done.set()
            watcher.cancel()
            self.running.pop(ctx_id, None)
        max_tokens = req.max_tokens or 16
        step = toy_model.trajectory(prompt, max_tokens, req.ignore_eos, req.stop)[0]
        first = step.tokens[0]
        if step.finish == "stop":
            finish, stop_reason = "stop", (step.matched if isinstance(step.matched, str) else None)
        elif max_tokens <= 1:
            finish, stop_reason = "length", None
        else:
            finish, stop_reason = "not_finished", None
        own_url = str(request.base_url).rstrip("/")
        state = base64.b64encode(json.dumps({"ctx": own_url, "id": ctx_id}).encode()).decode()
        params: dict[str, Any] = {"request_type": "context_only", "first_gen_tokens": [first],
                                  "ctx_request_id": ctx_id, "encoded_opaque_state": state, "draft_tokens": None}
        if cfg.newest_fields:
            params = {"request_type": "context_only", "first_gen_tokens": [first], "first_gen_log_probs": None,
                      "first_gen_logits": None, "ctx_request_id": ctx_id, "encoded_opaque_state": state,
                      "draft_tokens": None, "disagg_request_id": disagg_id, "ctx_dp_rank": 0,
                      "ctx_info_endpoint": None, "schedule_style": None, "ctx_usage": None,
                      "return_prompt_token_ids_b64": False, "resolved_thinking": None}
        if finish in ("not_finished", "length"):
            deadline = (time.monotonic() + cfg.kv_transfer_timeout_ms / 1000) if cfg.kv_transfer_timeout_ms else None
            self.pending[ctx_id] = _Pending(prompt, params, self._blocks(len(prompt)), deadline)
        self._record_iteration(completed=1)
        body = {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model,
            "choices": [self._choice(step.text, step.tokens, finish, stop_reason, req.detokenize, params)],
            "usage": self._usage(len(prompt), 1), "prompt_token_ids": prompt,
        }
        return JSONResponse(body)

    async def _generation(self, req: CompletionRequest, prompt: list[int], request: Request) -> Response:
        cfg = self.config
        if cfg.generation_error_status is not None:
            return self._error(f"Generation failed: injected HTTP {cfg.generation_error_status}",
                               status=cfg.generation_error_status,
                               kind="BadRequestError" if cfg.generation_error_status == 400 else "InternalServerError")
        params = req.disaggregated_params.model_dump()
        if not self.config.newest_fields:
            params = {k: params[k] for k in DisaggregatedParamsV1.model_fields}
        if cfg.auth_key and (params.get("encoded_opaque_state") or params.get("ctx_info_endpoint")):
            payload = json.dumps({"ctx_info_endpoint": params.get("ctx_info_endpoint"),
                                  "encoded_opaque_state": params.get("encoded_opaque_state")},
                                 sort_keys=True, separators=(",", ":")).encode()
            want = "sha256=" + hmac.new(cfg.auth_key.encode(), payload, hashlib.sha256).hexdigest()
            if request.headers.get("x-trtllm-disagg-auth") != want:
                return self._error("disaggregated request authentication failed")
        rid = params.get("disagg_request_id") or next(self._local_ids)
        if rid in self.running:
            return self._error(f"duplicate request id {rid}")
        error = None
        first: list[int] = []
        if cfg.transfer_delay_s:
            self.running[rid] = _Running(rid, prompt, self._blocks(len(prompt)), phase="generation")
            try:
                await asyncio.sleep(cfg.transfer_delay_s)
                gone = await request.is_disconnected()
            finally:
                self.running.pop(rid, None)
            if gone:
                self.aborted.append(rid)
                return self._error("request aborted")
        if cfg.transfer_fail:
            error = "Generation failed: KV cache transfer failed (injected)"
        else:
            try:
                state = json.loads(base64.b64decode(params["encoded_opaque_state"]))
                async with httpx.AsyncClient(base_url=state["ctx"], timeout=10) as client:
                    sent = {k: v for k, v in params.items()}
                    resp = await client.post("/_fake_transceiver/pull", json={
                        "ctx_request_id": params["ctx_request_id"], "params": sent, "prompt": prompt})
                    answer = resp.json()
                if answer.get("ok"):
                    first = answer["first_gen_tokens"]
                else:
                    error = f"Generation failed: KV cache transfer failed: {answer.get('error')}"
            except Exception as exc:  # noqa: BLE001
                error = f"Generation failed: KV cache transfer failed: {exc!r}"
        if error is not None and not req.stream:
            return self._error(error)
        steps = [] if error else toy_model.trajectory(prompt, req.max_tokens or 16, req.ignore_eos, req.stop,
                                                      first=first[0])
        skip = 0 if cfg.reemit_first_token else 1
        return await self._respond(req, rid, prompt, steps, request, skip=skip, error=error)

    async def _respond(self, req, rid: int, prompt: list[int], steps: list[toy_model.Step], request: Request,
                       skip: int, error: str | None = None) -> Response:
        if req.stream:
            return StreamingResponse(self._stream(req, rid, prompt, steps, error, skip),
                                     media_type="text/event-stream")
        running = _Running(rid, prompt, self._blocks(len(prompt) + (req.max_tokens or 16)), phase="generation")
        self.running[rid] = running
        done = asyncio.Event()
        watcher = asyncio.create_task(self._watch_disconnect(request, rid, done))
        try:
            for _ in steps:
                await asyncio.sleep(self.config.token_delay_s)
                if rid in self.aborted:
                    return self._error("request aborted")
                self._record_iteration()
        finally:
            done.set()
            watcher.cancel()
            self.running.pop(rid, None)
        last = steps[-1]
        self.finished.append(rid)
        stop_reason = last.matched if isinstance(last.matched, str) else None
        return JSONResponse({
            "id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": req.model,
            "choices": [self._choice(last.text, last.tokens, last.finish, stop_reason, req.detokenize)],
            "usage": self._usage(len(prompt), len(last.tokens)), "prompt_token_ids": None,
        })

    async def _stream(self, req, rid: int, prompt: list[int], steps: list[toy_model.Step], error: str | None,
                      skip: int = 0):
        cfg = self.config
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts and opts.continuous_usage_stats)
        created = int(time.time())
        sid = f"cmpl-{rid}"
        running = _Running(rid, prompt, self._blocks(len(prompt) + (req.max_tokens or 16)), phase="generation")
        self.running[rid] = running
        self._record_iteration(new=1)
        finished = False
        sent_tokens = skip
        sent_text = len(toy_model.detokenize(steps[0].tokens[:skip])) if steps and skip else 0

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> str:
            return "data: " + json.dumps({"id": sid, "object": "text_completion", "created": created,
                                          "model": req.model, "choices": choices, "usage": usage}) + "\n\n"

        try:
            if error is not None:
                yield "data: " + json.dumps({"error": {"message": error, "type": "server_error", "code": None,
                                                       "param": None}}) + "\n\n"
                yield "data: [DONE]\n\n"
                finished = True
                return
            for i, step in enumerate(steps):
                if i > 0:
                    await asyncio.sleep(cfg.token_delay_s)
                n = len(step.tokens)
                running.generated = n
                self._record_iteration()
                if cfg.disconnect_after is not None and n > cfg.disconnect_after:
                    raise ConnectionResetError("fake: connection dropped mid-stream")
                if cfg.stream_error_after is not None and n > cfg.stream_error_after:
                    yield "data: " + json.dumps({"error": {"message": "Generation failed: injected engine error",
                                                           "type": "server_error", "code": None,
                                                           "param": None}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
                if step.finish is None and n < cfg.first_chunk_tokens + skip:
                    continue
                stop_reason = step.matched if isinstance(step.matched, str) else None
                choice = self._choice(step.text[sent_text:], step.tokens[sent_tokens:], step.finish, stop_reason,
                                      req.detokenize, stream=True)
                sent_tokens, sent_text = n, len(step.text)
                yield chunk([choice], self._usage(len(prompt), n - skip) if continuous else None)
            if include_usage:
                yield chunk([], self._usage(len(prompt), len(steps[-1].tokens) - skip))
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            self.running.pop(rid, None)
            if finished:
                self.finished.append(rid)
            else:
                self.aborted.append(rid)  # "... is disconnected, abort <id>"


def create_app(config: TRTFakeConfig | None = None) -> FastAPI:
    """uvicorn entry: `uvicorn --factory tests.fakes.trtllm_fake:create_app`."""
    fake = TRTFake(config or TRTFakeConfig())
    fake.app.state.fake = fake
    return fake.app
