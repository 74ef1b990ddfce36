"""The worker process's HTTP API (docs/contracts.md) over any EngineCore (native or sim)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from backends.base import LoadReport, Role, SamplingParams, TokenEvent
from backends.engines.api import EngineCore, EngineRequest, KVPayload, KVPrefixGone, Mode, StepOutput
from backends.engines.kv_codec import KVReceiver, encode_kv_chunks, encoded_size
from backends.engines.kv_socket import KVAnnounce, KVRefused, KVSocketServer, load_kv_secret
from backends.engines.kv_socket import push_kv as socket_push_kv
from backends.engines.runner import EngineRunner
from backends.errors import error_body, error_response, install_error_handlers
from backends.http import transport

log = logging.getLogger("tetri.worker")
_LEASE_REAP_INTERVAL_S = 0.5
_PUSH_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=120.0, pool=10.0)
# How long (and how many) KV pushes the prefill side remembers, so that a late abort still frees them.
_PUSH_MEMORY_S = 60.0
_MAX_PUSHES = 10_000


async def _aiter(chunks: Iterator[memoryview | bytes]) -> AsyncIterator[memoryview | bytes]:
    for chunk in chunks:
        yield chunk


class SamplingBody(BaseModel):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


class HandoffBody(BaseModel):
    decode_url: str
    decode_instance_id: str = ""
    lease_s: float = 30.0


class WorkBody(BaseModel):
    request_id: str
    prompt_ids: list[int] = Field(min_length=1)
    sampling: SamplingBody = Field(default_factory=SamplingBody)
    predicted_output_lo: int | None = None
    heavy_decode: bool | None = None
    handoff: HandoffBody | None = None
    first_token: int | None = None
    lease_id: str | None = None
    # /prefill only: answer in NDJSON, the first token as soon as it is sampled, then the KV handoff.
    stream: bool = False

    def engine_request(self, mode: Mode) -> EngineRequest:
        return EngineRequest(
            request_id=self.request_id,
            prompt_ids=self.prompt_ids,
            sampling=SamplingParams(**self.sampling.model_dump()),
            mode=mode,
            first_token=self.first_token,
            predicted_output_lo=self.predicted_output_lo,
            heavy_decode=self.heavy_decode,
        )


class AbortBody(BaseModel):
    request_id: str


class DrainBody(BaseModel):
    accepting: bool = False


class RoleBody(BaseModel):
    role: Role


@dataclass
class KVLease:
    """Imported KV that waits for its decode request; freed by the reaper after `deadline`."""

    lease_id: str
    request_id: str
    num_tokens: int
    nbytes: int
    deadline: float


@dataclass
class KVPush:
    """One prefill's KV hand-off, remembered for a while after it ends. The orchestrator aborts both
    sides of a hand-off the client left; its abort can reach the decode worker before the pushed KV
    lands there, and the lease made then would wait out its expiry (30 s). The prefill side sees the
    push end, so it frees that lease itself: whichever of the abort and the push's end comes last
    releases it, by lease id (a later attempt of the same request id keeps its own lease)."""

    decode_url: str
    expires: float
    aborted: bool = False
    lease_id: str | None = None


class KVPushFailed(Exception):
    """The prefill side could not hand a KV to its decode worker: refused (503/507) or unreachable (502)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def retry_after(self) -> float | None:
        return 1.0 if self.status in (503, 507) else None


def _error(status: int, message: str, code: str = "invalid_request", retry_after: float | None = None):
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return error_response(status, message, type_, code=code, retry_after=retry_after or None)


def _event(out: StepOutput, phase: str) -> TokenEvent:
    reason = out.finish_reason
    return TokenEvent(
        token_ids=[out.token_id] if out.token_id is not None else [],
        text=out.text,
        finish_reason=None if reason == "prefilled" else reason,  # type: ignore[arg-type]
        phase=phase,  # type: ignore[arg-type]
        error=out.error,
        cached_tokens=out.cached_tokens,
    )


class WorkerState:
    def __init__(self, core: EngineCore, backend: str) -> None:
        self.core = core
        self.backend = backend
        self.runner = EngineRunner(core)
        self.accepting = True
        self.leases: dict[str, KVLease] = {}
        self.http = httpx.AsyncClient(timeout=_PUSH_TIMEOUT, transport=transport())
        self.ready = False
        self.ready_since: float | None = None  # epoch seconds: when /health first said ok
        self.loop: asyncio.AbstractEventLoop | None = None
        self.kv_ports: dict[str, int | None] = {}
        self.kv_socket: KVSocketServer | None = None
        self.kv_secret = b""  # the KV socket channel's shared secret (both directions)
        # (layers, kv heads, head dim) of this engine's KV, when it says: what a pushed KV must match.
        self.kv_geometry: tuple[int, int, int] | None = None
        self.kv_pool_tokens: int | None = None
        self.pushes: dict[str, KVPush] = {}  # by request id, oldest first

    async def load(self, kv_since: int | None = None) -> LoadReport:
        """The engine's load; with `kv_since`, its prefix-cache block events after that event number
        (each poller, e.g. each orchestrator replica, keeps its own number)."""
        snapshot = self.runner.snapshot
        report = replace(snapshot) if snapshot is not None else await self.runner.call(lambda core: core.load())
        report.leased_kv_tokens = sum(lease.num_tokens for lease in self.leases.values())
        report.active_leases = len(self.leases)
        report.accepting = self.accepting
        report.backend = self.backend
        if kv_since is not None and hasattr(self.core, "kv_events"):
            report.kv_events = self.core.kv_events(kv_since)  # thread-safe: no wait behind a step
        return report

    async def accept_kv(self, payload: KVPayload, lease_s: float) -> dict[str, Any]:
        """Import a pushed KV into the pool under a lease (HTTP PUT and the socket channel)."""
        if not self.accepting:
            raise KVRefused(503, "worker is draining")
        if payload.model != self.core.model_name:
            raise KVRefused(409, f"KV from model {payload.model!r}, this worker serves {self.core.model_name!r}")
        rid = payload.request_id
        await self.release_lease(rid)  # a retried push replaces the earlier one
        try:
            # Off the engine thread: the copy overlaps the current forward pass instead of queueing
            # behind it (import_kv is the one thread-safe EngineCore call).
            await asyncio.to_thread(self.core.import_kv, payload)
        except MemoryError as exc:
            raise KVRefused(507, f"KV pool full: {exc}") from exc
        except KVPrefixGone as exc:  # the positions the push skipped were evicted meanwhile
            raise KVRefused(410, str(exc)) from exc
        await self.runner.refresh_snapshot()
        nbytes = payload.data.numel() * payload.data.element_size()
        lease = KVLease(uuid.uuid4().hex, rid, payload.num_tokens, nbytes, time.time() + lease_s)
        self.leases[rid] = lease
        return {"lease_id": lease.lease_id, "deadline": lease.deadline, "num_tokens": lease.num_tokens,
                "nbytes": lease.nbytes}

    def admit_kv(self, announce: KVAnnounce, inflight_tokens: int) -> int:
        """The socket channel asks before it allocates a pushed KV's buffer: refuse what the pool
        cannot take (`inflight_tokens`: other pushes admitted, not yet imported). Returns the leading
        positions the prefix cache holds, which the sender skips."""
        if not self.accepting:
            raise KVRefused(503, "worker is draining")
        if announce.model != self.core.model_name:
            raise KVRefused(409, f"KV from model {announce.model!r}, this worker serves {self.core.model_name!r}")
        if self.kv_geometry is not None:
            layers, heads, head_dim = self.kv_geometry
            expected = (layers, 2, announce.num_tokens, heads, head_dim)
            if announce.shape != expected:
                raise KVRefused(400, f"KV shape {announce.shape} does not match this model's {expected}")
        snapshot = self.runner.snapshot  # None until the engine's first command: the pool is empty then
        total = snapshot.total_kv_tokens if snapshot else self.kv_pool_tokens
        if total is not None:
            self._check_room(announce, inflight_tokens, total, snapshot)
        held = getattr(self.core, "held_prefix_tokens", None)
        if not announce.block_hashes or held is None:
            return 0
        return held(list(announce.block_hashes), announce.num_tokens)

    def _check_room(self, announce: KVAnnounce, inflight_tokens: int, total: int, snapshot: LoadReport | None) -> None:
        if announce.num_tokens > total:
            raise KVRefused(413, f"KV of {announce.num_tokens} tokens exceeds the pool ({total})")
        replaced = self.leases.get(announce.request_id)  # a retried push frees the earlier one first
        free = (snapshot.free_kv_tokens if snapshot else total) - inflight_tokens
        free += replaced.num_tokens if replaced else 0
        if announce.num_tokens > free:
            raise KVRefused(507, f"KV pool full: {announce.num_tokens} tokens, {max(free, 0)} free")

    def accept_kv_from_thread(self, payload: KVPayload, lease_s: float) -> dict[str, Any]:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self.accept_kv(payload, lease_s), self.loop).result(timeout=120)

    async def kv_port_of(self, decode_url: str) -> int | None:
        """The decode worker's raw KV socket port (from its /info), cached per URL."""
        if decode_url not in self.kv_ports:
            try:
                info = (await self.http.get(f"{decode_url.rstrip('/')}/info", timeout=5.0)).json()
                self.kv_ports[decode_url] = info.get("kv_port")
            except (httpx.HTTPError, ValueError):
                return None
        return self.kv_ports[decode_url]

    def begin_push(self, request_id: str, decode_url: str) -> KVPush:
        now = time.monotonic()
        while self.pushes:  # forget expired records, and the oldest beyond the bound
            oldest = next(iter(self.pushes))
            if self.pushes[oldest].expires > now and len(self.pushes) < _MAX_PUSHES:
                break
            del self.pushes[oldest]
        self.pushes.pop(request_id, None)  # a new attempt of the request replaces the earlier record
        push = self.pushes[request_id] = KVPush(decode_url.rstrip("/"), now + _PUSH_MEMORY_S)
        return push

    async def drop_pushed(self, request_id: str, push: KVPush) -> None:
        """Free the lease this push made on the decode worker (that lease only)."""
        lease_id, push.lease_id = push.lease_id, None
        if lease_id is None:
            return
        with contextlib.suppress(httpx.HTTPError):
            await self.http.delete(f"{push.decode_url}/kv/{request_id}", params={"lease_id": lease_id}, timeout=5.0)

    async def abort_push(self, request_id: str) -> None:
        push = self.pushes.get(request_id)
        if push is not None:
            push.aborted = True
            await self.drop_pushed(request_id, push)

    async def release_lease(self, request_id: str, lease_id: str | None = None) -> bool:
        lease = self.leases.get(request_id)
        if lease is None or (lease_id is not None and lease.lease_id != lease_id):
            return False
        del self.leases[request_id]
        await self.runner.call(lambda core: core.release_kv(request_id))
        return True

    async def reap_leases(self) -> None:
        while True:
            await asyncio.sleep(_LEASE_REAP_INTERVAL_S)
            now = time.time()
            for rid in [rid for rid, lease in self.leases.items() if lease.deadline <= now]:
                with contextlib.suppress(Exception):
                    await self.release_lease(rid)


def create_worker_app(core: EngineCore, backend: str = "native", kv_port: int | None = 0,
                      kv_host: str = "127.0.0.1", kv_secret: bytes | None = None) -> FastAPI:
    """`kv_port`: port of the raw KV socket channel (0: any free port; None: HTTP pushes only), bound
    to `kv_host` (the worker's own bind address); `kv_secret`: the workers' shared secret
    (default: `load_kv_secret()`)."""
    state = WorkerState(core, backend)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.kv_secret = kv_secret or load_kv_secret()
        info = core.info()
        with contextlib.suppress(KeyError, TypeError, ValueError):
            state.kv_geometry = (int(info["num_layers"]), int(info["num_kv_heads"]), int(info["head_dim"]))
        with contextlib.suppress(KeyError, TypeError, ValueError):
            state.kv_pool_tokens = int(info["total_kv_tokens"])
        if kv_port is not None:
            state.kv_socket = KVSocketServer(state.accept_kv_from_thread, state.kv_secret, host=kv_host,
                                             port=kv_port, admit=state.admit_kv).start()
        state.runner.start()
        reaper = asyncio.create_task(state.reap_leases())
        state.ready, state.ready_since = True, time.time()
        yield
        reaper.cancel()
        if state.kv_socket is not None:
            state.kv_socket.stop()
        state.runner.stop()
        await state.http.aclose()

    app = FastAPI(title="tetri worker", lifespan=lifespan)
    install_error_handlers(app)  # validation errors in the contract's {"error": {...}} shape, as the orchestrator's
    app.state.worker = state

    def refuse_if_draining() -> JSONResponse | None:
        if not state.accepting:
            return _error(503, "worker is draining", code="draining", retry_after=1)
        return None

    async def stream(req: EngineRequest, phase: str) -> StreamingResponse | JSONResponse:
        # Validate and enqueue before answering 200, so bad input gets a proper 4xx.
        outputs = state.runner.submit(req)
        try:
            first = await outputs.__anext__()
        except ValueError as exc:
            return _error(400, str(exc))
        except MemoryError as exc:
            return _error(503, str(exc), code="kv_full", retry_after=1)

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield (json.dumps(asdict(_event(first, phase))) + "\n").encode()
                if first.finish_reason is not None:
                    return
                async for out in outputs:
                    yield (json.dumps(asdict(_event(out, phase))) + "\n").encode()
            finally:
                await outputs.aclose()  # aborts the request if the client went away

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if state.ready else 503
        return JSONResponse(
            {"status": "ok" if state.ready else "loading", "role": core.role, "model": core.model_name,
             "backend": backend, "accepting": state.accepting, "ready_since": state.ready_since},
            status_code=status,
        )

    @app.get("/load")
    async def load(kv_since: int | None = None) -> dict[str, Any]:
        return (await state.load(kv_since)).to_dict()

    @app.get("/passes")
    async def passes(since: float = 0.0) -> dict[str, Any]:
        """Recent forward passes, {ms, at, tokens, units, seqs, dseqs, ctx}: what a timing model is fitted to."""
        return {"passes": [p for p in list(state.runner.passes) if p["at"] > since]}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return {"max_context": getattr(core, "max_context", None), **core.info(), "role": core.role,
                "backend": backend, "chunk_size": core.chunk_size,
                "kv_port": state.kv_socket.port if state.kv_socket else None}

    @app.post("/generate")
    async def generate(body: WorkBody):
        return refuse_if_draining() or await stream(body.engine_request("full"), "generate")

    @app.post("/prefill")
    async def prefill(body: WorkBody):
        if (refused := refuse_if_draining()) is not None:
            return refused
        if body.handoff is None:
            return _error(400, "prefill needs a handoff (decode_url)")
        push = state.begin_push(body.request_id, body.handoff.decode_url)  # before an abort can come
        outputs = state.runner.submit(body.engine_request("prefill_only"))
        try:
            first = await outputs.__anext__()
        except ValueError as exc:
            return _error(400, str(exc))
        finally:
            await outputs.aclose()
        event = _event(first, "prefill")
        if first.finish_reason != "prefilled":
            # Finished at the first token (EOS, stop, max_tokens=1, error): nothing to hand off.
            if event.finish_reason is None:
                event.finish_reason = "stop"
            done = {"first": asdict(event), "kv": None}
            if body.stream:
                return StreamingResponse(iter([json.dumps(done) + "\n"]), media_type="application/x-ndjson")
            return done
        assert first.kv is not None, "the runner exports a prefilled request's KV"
        if body.stream:
            return StreamingResponse(prefill_lines(body, event, first.kv, push), media_type="application/x-ndjson")
        try:
            return {"first": asdict(event), "kv": await push_kv(body, event, first.kv, push)}
        except KVPushFailed as exc:
            return _error(exc.status, str(exc), code=exc.code, retry_after=exc.retry_after)

    async def prefill_lines(body: WorkBody, event: TokenEvent, payload: KVPayload,
                            push: KVPush) -> AsyncIterator[str]:
        """The streamed /prefill: the first token goes out before the KV push starts."""
        yield json.dumps({"first": asdict(event)}) + "\n"
        try:
            kv = await push_kv(body, event, payload, push)
        except KVPushFailed as exc:
            yield json.dumps({**error_body(str(exc), "server_error", code=exc.code), "status": exc.status}) + "\n"
            return
        yield json.dumps({"kv": kv}) + "\n"

    async def push_kv(body: WorkBody, event: TokenEvent, payload: KVPayload, push: KVPush) -> dict[str, Any]:
        """Push the KV to the decode worker; the handle the decode call claims it with. The push
        runs to its end even if the caller leaves (a thread cannot be stopped mid-send), and frees
        its lease when the request was aborted or the caller left meanwhile."""
        if push.aborted:
            raise KVPushFailed(409, "the request was aborted before its KV push", "aborted")
        task = asyncio.ensure_future(send_kv(body, event, payload, push))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, even with nobody waiting
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            push.aborted = True  # the caller left: nobody will claim the lease this push makes
            raise

    async def send_kv(body: WorkBody, event: TokenEvent, payload: KVPayload, push: KVPush) -> dict[str, Any]:
        rid = body.request_id
        assert body.handoff is not None
        nbytes = encoded_size(payload)
        decode_url = body.handoff.decode_url.rstrip("/")
        lease_s = body.handoff.lease_s
        started = time.perf_counter()
        port = await state.kv_port_of(decode_url)
        try:
            lease = None
            if port is not None:
                host = httpx.URL(decode_url).host
                try:
                    lease = await asyncio.to_thread(socket_push_kv, host, port, payload, lease_s, state.kv_secret)
                except KVRefused as exc:
                    if exc.status == 410:  # it evicted the prefix it told us to skip: this one whole, over HTTP
                        log.info("KV push of %s: the held prefix was evicted; pushing it whole", rid)
                    elif exc.status != 401:
                        raise
                    else:
                        # Our secrets differ: the HTTP API still takes the KV; stop trying the socket there.
                        log.warning("KV socket of %s refused our secret; pushing over HTTP from now on", decode_url)
                        state.kv_ports[decode_url] = None
                except ConnectionRefusedError:
                    # The decode worker restarted (same URL, new KV port): push this one over HTTP and
                    # read its port again for the next.
                    state.kv_ports.pop(decode_url, None)
            if lease is None:
                resp = await state.http.put(f"{decode_url}/kv/{rid}", content=_aiter(encode_kv_chunks(payload)),
                                            params={"lease_s": lease_s}, headers={"content-length": str(nbytes)})
                if resp.status_code >= 400:
                    raise KVRefused(resp.status_code, resp.text[:300])
                lease = resp.json()
        except KVRefused as exc:
            status = exc.status if exc.status in (503, 507) else 502
            raise KVPushFailed(status, f"decode worker refused KV: {exc}", "kv_push_refused") from exc
        except (OSError, httpx.HTTPError) as exc:
            raise KVPushFailed(502, f"KV push to {decode_url} failed: {exc!r}", "kv_push_failed") from exc
        transfer_s = time.perf_counter() - started
        push.lease_id = lease["lease_id"]
        if push.aborted:  # aborted while the KV was on its way: the decode side's abort came too early
            await state.drop_pushed(rid, push)
            raise KVPushFailed(409, "the request was aborted during its KV push", "aborted")
        return {"request_id": rid, "num_tokens": payload.num_tokens, "first_token_id": event.token_ids[0],
                "lease_id": lease["lease_id"], "lease_deadline": lease["deadline"], "nbytes": nbytes,
                "transfer_s": transfer_s,
                "extra": {k: lease[k] for k in ("wire_s", "import_s", "skipped_tokens") if k in lease}}

    @app.put("/kv/{request_id}")
    async def receive_kv(request_id: str, request: Request, lease_s: float = 30.0):
        if (refused := refuse_if_draining()) is not None:
            return refused
        try:
            size = int(request.headers["content-length"])
        except (KeyError, ValueError):
            return _error(411, "KV push needs a Content-Length")
        try:
            receiver = KVReceiver(size)
            async for chunk in request.stream():
                receiver.write(chunk)
            payload = receiver.payload()
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            return _error(400, f"bad KV payload: {exc}")
        if payload.request_id != request_id:
            return _error(400, "KV payload is for another request")
        try:
            return await state.accept_kv(payload, lease_s)
        except KVRefused as exc:
            return _error(exc.status, str(exc), code="kv_refused", retry_after=1 if exc.status >= 500 else None)

    @app.delete("/kv/{request_id}")
    async def drop_kv(request_id: str, lease_id: str | None = None):
        return {"released": await state.release_lease(request_id, lease_id)}

    @app.post("/decode")
    async def decode(body: WorkBody):
        lease = state.leases.get(body.request_id)
        if lease is None or (body.lease_id and lease.lease_id != body.lease_id):
            return _error(404, f"no KV lease for request {body.request_id} (expired or never pushed)",
                          code="kv_lease_missing")
        if body.first_token is None:
            return _error(400, "decode needs first_token")
        state.leases.pop(body.request_id)  # claimed: the running request now owns the blocks
        return await stream(body.engine_request("decode_only"), "decode")

    @app.post("/abort")
    async def abort(body: AbortBody):
        await state.abort_push(body.request_id)  # the prefill side: a push under way or just made
        released = await state.release_lease(body.request_id)
        await state.runner.call(lambda c: c.abort(body.request_id))
        return {"aborted": True, "lease_released": released}

    @app.post("/drain")
    async def drain(body: DrainBody):
        state.accepting = body.accepting
        return {"accepting": state.accepting}

    @app.post("/role")
    async def set_role(body: RoleBody):
        """Stop new work, wait for running work (and leases) to end, flip in place."""
        state.accepting = False
        started = time.perf_counter()
        while True:
            report = await state.load()
            if report.running == 0 and report.queued == 0 and not state.leases:
                break
            await asyncio.sleep(0.02)
        drained = time.perf_counter()
        await state.runner.call(lambda c: c.set_role(body.role))
        flipped = time.perf_counter()
        state.accepting = True
        return {"role": body.role, "drain_s": drained - started, "flip_s": flipped - drained}

    return app
