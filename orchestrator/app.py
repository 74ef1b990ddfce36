"""The orchestrator application: wires settings, cluster, monitor, placement, server and store
into one FastAPI app (`create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backends.base import BackendError, Role
from backends.http import PoolLimits, tls_context
from orchestrator import metrics
from orchestrator.admin_api import build_admin_router
from orchestrator.auth import api_key_dependencies
from orchestrator.body_limit import BodyLimitMiddleware
from orchestrator.cluster import Cluster, Instance, check_url, url_key
from orchestrator.config import InstanceSpec, Settings
from orchestrator.errors import APIError, install_error_handlers
from orchestrator.hot_path import HotPath, HotPathApp, HotRoute
from orchestrator.leader import DEAD_REPLICA_ERROR, InstanceSync, Leader, shareable_options
from orchestrator.monitor import ClusterMonitor, check_load
from orchestrator.openai_api import build_router
from orchestrator.placement import Placement
from orchestrator.policies.flip import make_flip_policy
from orchestrator.policies.predictors import make_predictor
from orchestrator.pool_planner import AutoPlanner
from orchestrator.pools import make_provider
from orchestrator.pools.base import PoolProvider, ReadyInstance
from orchestrator.serving import Job, Server
from orchestrator.store import Store
from orchestrator.tokenizer import PromptBuilder, is_builtin
from orchestrator.tracing import TraceContextMiddleware, setup_tracing

_GC_YOUNG_THRESHOLD = 10_000
log = logging.getLogger("tetri.app")
_DEFAULT_CONTEXT = 8192
_RESTART_ERROR = "orchestrator restarted while the request was in flight"
_STARTUP_REGISTER_TIMEOUT_S = 60.0


class AppState:
    """Everything the HTTP routes need, in one place."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.cluster = Cluster(PoolLimits(settings.backend_max_connections, settings.backend_acquire_timeout_s))
        self.store = store or Store(settings.database_url)
        self.store.replica = settings.replica_id  # stamped on our rows: crash recovery claims only those
        self.monitor = ClusterMonitor(self.cluster, settings.monitor_interval_ms, settings.monitor_failures_unhealthy)
        self.placement = Placement(settings, self.cluster)
        # Loaded in the lifespan, off the event loop (the learned model takes seconds).
        self.predictor: Any = None
        self.live_accuracy = _live_accuracy(None, settings.predictor_granularity)
        self.flip_policy = make_flip_policy(
            settings.flip_policy, idle_s=settings.flip_idle_s, min_per_role=settings.flip_min_per_role,
            cooldown_s=settings.flip_cooldown_s, load_kv_threshold=settings.flip_load_kv_threshold,
        )
        self.server = Server(settings, self.cluster, self.placement, self.store, self.predictor, self._finished)
        # OpenTelemetry, only when configured (the SDK is imported then, not before).
        self.server.tracing = self.tracing = setup_tracing(settings.otel_endpoint, settings.otel_service_name)
        self.max_context = _DEFAULT_CONTEXT
        self._builders: dict[str, PromptBuilder] = {}
        self._tokenizer_loads: dict[str, asyncio.Future[PromptBuilder]] = {}
        # Instances being health-checked (id -> URL key): a second registration of either is a conflict.
        self._registering: dict[str, tuple[str, str, int | None, str]] = {}
        self._flipping: set[str] = set()
        # A plan simulates thousands of requests per candidate (seconds of CPU): one at a time.
        self.planning = asyncio.Lock()
        self.auto_planner = AutoPlanner(self)
        # What scales the pools (GET/PUT /admin/pools): made and started in the lifespan.
        self.pool_provider: PoolProvider | None = None
        # Several replicas on one store (orchestrator/leader.py): every replica serves; the flip policy,
        # the automatic planner and recovery of dead replicas run on the leader only.
        self.leader = Leader(self.store, settings.replica_id, lease_s=settings.leader_lease_s,
                             renew_s=settings.leader_renew_s, replica_timeout_s=settings.replica_timeout_s)  # fmt: skip
        self.leader.duties.append(self._recover_dead_replicas)
        self.leader.on_change.append(self._leadership_changed)
        self.instance_sync = InstanceSync(self.store, self.cluster, self.register, self.forget, self._save_instance,
                                          settings.instance_sync_s)  # fmt: skip

    # ---- models and prompts ----------------------------------------------------------------------
    def served_models(self) -> list[str]:
        names = set(self.cluster.models())
        if not names:
            names.add(self.settings.public_model_name)
        return sorted(names)

    def prompt_builder(self, model: str) -> PromptBuilder:
        """The served model's prompt builder, loaded at start or at registration: the request path
        never loads a tokenizer (that blocks for seconds)."""
        builder = self._builders.get(model)
        if builder is None:
            raise APIError(503, f"the tokenizer of model {model!r} is not loaded", "server_error", param="model",
                           code="tokenizer_unavailable")  # fmt: skip
        return builder

    def tokenizer_source(self, model: str) -> str | None:
        """Where `model`'s tokenizer comes from, by the operator's configuration only: `tokenizers`
        (its own entry), the served model (`model`), the built-in default (its name or `random:*`,
        never a path), else the `tokenizers["*"]` fallback. None: the model has no tokenizer."""
        configured = self.settings.tokenizers
        if model in configured:
            return configured[model]
        if model == self.settings.public_model_name:
            return self.settings.model
        if is_builtin(model):
            return model
        return configured.get("*")

    async def load_default_builder(self) -> None:
        """At start: the served model's tokenizer. Without one the orchestrator still starts (its
        admin API works); requests for the model get 503 and its instances are refused."""
        try:
            await self.load_prompt_builder(self.settings.public_model_name)
        except APIError as exc:
            log.error("%s", exc.message)

    async def load_prompt_builder(self, model: str) -> PromptBuilder:
        """Load `model`'s tokenizer once, in a thread, within `tokenizer_load_timeout_s`. Raises
        APIError 400 when the model has none (not configured, not found offline)."""
        builder = self._builders.get(model)
        if builder is not None:
            return builder
        source = self.tokenizer_source(model)
        if source is None:
            raise APIError(400, f"no tokenizer for model {model!r}: the orchestrator counts prompt tokens itself; "
                           f"configure one with tokenizers: {{{model!r}: <local tokenizer directory or .gguf>}}",
                           param="model", code="tokenizer_not_found")  # fmt: skip
        task = self._tokenizer_loads.get(source)
        if task is None:  # one load per source, however many registrations wait for it
            task = asyncio.ensure_future(asyncio.to_thread(PromptBuilder, source))
            self._tokenizer_loads[source] = task
            task.add_done_callback(lambda _: self._tokenizer_loads.pop(source, None))
        timeout = self.settings.tokenizer_load_timeout_s
        try:
            # Shielded: a timed-out load goes on in its thread and fills load_tokenizer's cache.
            builder = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError as exc:
            raise APIError(503, f"loading the tokenizer of model {model!r} ({source}) took over {timeout:g}s",
                           "server_error", param="model", code="tokenizer_load_timeout",
                           retry_after=timeout) from exc  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - not found, unreadable, not a tokenizer
            raise APIError(400, f"cannot load the tokenizer of model {model!r} from {source}: {exc}",
                           param="model", code="tokenizer_not_found") from exc  # fmt: skip
        self._builders[model] = builder
        return builder

    # ---- instances ---------------------------------------------------------------------------------
    async def register(self, spec: InstanceSpec, timeout_s: float | None = None) -> Instance:
        """Check an instance (URL, conflicts, tokenizer, health within `register_timeout_s`) before it
        takes traffic, then record it. A refused instance leaves nothing behind: it joins the cluster
        (monitor, placement, /v1/models) and the store only once it answered healthy."""
        started = time.perf_counter()
        timeout_s = self.settings.register_timeout_s if timeout_s is None else timeout_s
        why = check_url(spec.url)
        if why is not None:
            raise APIError(400, why, param="url", code="invalid_url")
        for field, limit in (("id", 128), ("model", 256)):  # the store's column widths
            if len(getattr(spec, field) or "") > limit:
                raise APIError(400, f"{field} is longer than {limit} characters", param=field)
        if spec.model is None and spec.backend in ("native", "sim"):
            spec = spec.model_copy(update={"model": self.settings.public_model_name})
        key = url_key(spec.url)
        taken = self.cluster.by_url(spec.url)
        if taken is not None or key in self._registering.values():
            owner = f"instance {taken.id!r}" if taken is not None else "a registration in progress"
            raise APIError(409, f"{spec.url} is already registered ({owner})", param="url", code="instance_conflict")
        if spec.id is not None and spec.id in self._registering:
            raise APIError(409, f"instance {spec.id!r} is being registered", param="id", code="instance_conflict")
        try:
            inst = self.cluster.create(spec)
        except ValueError as exc:  # the id is taken
            raise APIError(409, str(exc), param="id", code="instance_conflict") from exc
        except TypeError as exc:  # options the adapter does not take
            raise APIError(400, f"invalid options for backend {spec.backend}: {exc}", param="options") from exc
        # Reserved until attached or refused (no await since the checks above: they still hold).
        self._registering[inst.id] = key
        try:
            if inst.model:
                await self.load_prompt_builder(inst.model)
            # Both at once: a new instance takes traffic one round trip sooner (issue 19's scale-up).
            info = asyncio.ensure_future(asyncio.wait_for(inst.backend.info(), timeout_s))
            why: str | None = "cancelled"
            try:
                why = await self.monitor.check_health(inst, timeout_s)
            finally:
                if why is not None:  # refused, or the registration was cancelled: its answer is moot
                    info.cancel()
                await asyncio.gather(info, return_exceptions=True)
            if why is not None:
                raise BackendError(f"instance at {spec.url} did not become healthy in {timeout_s:g}s: {why}",
                                   status=502)  # fmt: skip
            if not info.cancelled() and info.exception() is None:
                inst.info = info.result()
                context = inst.info.get("max_context")
                if isinstance(context, int) and context > 0:
                    self.max_context = context
            self.cluster.attach(inst)
        except BaseException:
            with contextlib.suppress(Exception):
                await inst.backend.close()
            raise
        finally:
            self._registering.pop(inst.id, None)
        self._save_instance(inst)
        self.instance_sync.registered_at[inst.id] = time.time()
        self.event("register", inst.id, {"url": spec.url, "backend": spec.backend, "role": inst.role},
                   time.perf_counter() - started)
        return inst

    async def deregister(self, inst: Instance) -> dict[str, Any]:
        """Drain (no new work; wait for running work), then forget the instance. An instance that
        is not answering (unhealthy, never healthy) is forgotten at once: nothing runs there to wait for."""
        started = time.perf_counter()
        reachable = inst.state in ("healthy", "draining", "flipping")
        inst.state = "draining"
        if reachable:
            # Requests already routed here (prompts released to it, KV on its way) finish first, as
            # before a flip: the engine would refuse them once it drains.
            await self._wait_released(inst)
            with contextlib.suppress(Exception):
                # An engine that does not answer within the registration timeout is not answering.
                await asyncio.wait_for(inst.backend.drain(False), self.settings.register_timeout_s)
            await self._wait_idle(inst)
        if self.cluster.get(inst.id) is not inst:  # a concurrent DELETE got there first
            return {"id": inst.id, "state": "removed", "drain_s": time.perf_counter() - started}
        self.instance_sync.removed_at[inst.id] = time.time()
        self.cluster.remove(inst.id)
        self.placement.replace_queued(inst)
        with contextlib.suppress(Exception):
            await inst.backend.close()
        self._save_instance(inst)
        duration = time.perf_counter() - started
        self.event("deregister", inst.id, {}, duration)
        return {"id": inst.id, "state": "removed", "drain_s": duration}

    async def forget(self, inst: Instance) -> None:
        """A peer replica deregistered `inst` (it drained the engine): stop using it here, without
        draining it again or writing its row."""
        inst.state = "draining"
        self.placement.replace_queued(inst)
        await self._wait_released(inst, self.settings.register_timeout_s)
        if self.cluster.get(inst.id) is inst:
            self.cluster.remove(inst.id)
            with contextlib.suppress(Exception):
                await inst.backend.close()
            log.info("instance %s deregistered through a peer replica: forgotten here", inst.id)

    # ---- leadership (orchestrator/leader.py) ---------------------------------------------------------
    async def _recover_dead_replicas(self) -> None:
        for done in await asyncio.to_thread(
            self.store.recover_dead_replicas, self.settings.replica_timeout_s, DEAD_REPLICA_ERROR
        ):
            log.warning("replica %s stopped answering: %s", done["replica"], done)
            self.event("recover", None, done)

    def _leadership_changed(self, leader: bool) -> None:
        self.event("leader", None, {"replica": self.settings.replica_id, "leader": leader, "term": self.leader.term})

    # ---- pool providers (orchestrator/pools/base.py: OnReady, OnLeaving) ---------------------------
    async def pool_ready(self, ready: ReadyInstance) -> None:
        """A provider's instance is up: register it as POST /admin/instances does. Idempotent by URL."""
        if self.cluster.by_url(ready.url) is not None:
            return
        spec = InstanceSpec(url=ready.url, backend=ready.backend, role=ready.role, model=ready.model, id=ready.id,
                            options=dict(ready.options))  # fmt: skip
        try:
            await self.register(spec)
        except APIError as exc:
            if exc.code == "instance_conflict" and self.cluster.by_url(ready.url) is not None:
                return  # registered meanwhile (a concurrent call for the same URL)
            raise

    async def pool_leaving(self, url: str) -> None:
        """A provider is about to stop the instance at `url`: drain it, then deregister it."""
        inst = self.cluster.by_url(url)
        if inst is not None:
            await self.deregister(inst)

    def healthy_per_role(self) -> dict[Role, int]:
        counts: dict[Role, int] = {}
        for inst in self.cluster.instances.values():
            if inst.state == "healthy":
                counts[inst.role] = counts.get(inst.role, 0) + 1
        return counts

    async def flip(self, inst: Instance, role: Role) -> dict[str, Any]:
        """Stop new work, drain, change role in place (no model reload), re-register."""
        if inst.id in self._flipping:
            raise BackendError(f"instance {inst.id} is already flipping", status=409)
        if role == inst.role:
            return {"id": inst.id, "role": role, "changed": False}
        self._flipping.add(inst.id)
        started = time.perf_counter()
        old_role = inst.role
        inst.state = "flipping"
        try:
            self.placement.replace_queued(inst)
            # Requests already released to it finish their part first: once flipped, a prefill
            # sent to it would be refused.
            await self._wait_released(inst)
            result = await inst.backend.set_role(role)
        except BackendError:
            inst.state = "healthy"
            raise
        finally:
            self._flipping.discard(inst.id)
        inst.state = "healthy"
        self.placement.forget(inst)
        duration = time.perf_counter() - started
        detail = {"from": old_role, "to": role, **{k: v for k, v in result.items() if k != "role"}}
        self.event("flip", inst.id, detail, duration)
        metrics.FLIPS.labels(to_role=role).inc()
        self._save_instance(inst)
        return {"id": inst.id, "role": role, "changed": True, "duration_s": duration, **detail}

    async def _wait_released(self, inst: Instance, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        # Prefills released to it, and decodes routed to it whose KV has not arrived yet.
        while (inst.inflight_prefills > 0 or inst.reserved_kv_tokens > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _wait_idle(self, inst: Instance, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and inst.state != "removed":
            try:
                load = check_load(await asyncio.wait_for(inst.backend.load(), self.settings.register_timeout_s))
            except Exception:  # noqa: BLE001 - gone, hung or garbled: nothing to wait for
                return
            self.monitor.seen(inst, load)
            if load.running == 0 and load.queued == 0 and inst.inflight_prefills == 0:
                return
            await asyncio.sleep(0.05)

    async def on_monitor_tick(self) -> None:
        self.placement.pump_all()
        for role in ("prefill", "decode", "colocated"):
            for state in ("healthy", "unhealthy", "draining", "flipping"):
                count = sum(1 for i in self.cluster.instances.values() if i.role == role and i.state == state)
                metrics.INSTANCES.labels(role=role, state=state).set(count)
        metrics.observe_instances(self.cluster.instances.values())
        if not self.leader.is_leader:  # the leader flips for every replica; followers see it in load reports
            return
        views = [i.view() for i in self.cluster.instances.values() if i.role in ("prefill", "decode")]
        for decision in self.flip_policy.decide(views, time.monotonic()):
            inst = self.cluster.get(decision.instance_id)
            if inst is not None and inst.id not in self._flipping:
                asyncio.get_running_loop().create_task(self._auto_flip(inst, decision.to_role))

    @property
    def flips_running(self) -> bool:
        return bool(self._flipping)

    async def auto_plan(self) -> None:
        if not self.leader.is_leader:
            return
        try:
            await self.auto_planner.tick()
        except Exception:  # a failed flip or plan must not stop the timer; the next tick retries
            log.exception("automatic pool planning failed")

    async def _auto_flip(self, inst: Instance, role: Role) -> None:
        try:
            await self.flip(inst, role)
        except BackendError as exc:
            log.warning("automatic flip of %s failed: %s", inst.id, exc)

    def _on_state_change(self, inst: Instance, old: str, new: str) -> None:
        self.event("unhealthy" if new == "unhealthy" else "healthy", inst.id, {"from": old, "to": new})
        self._save_instance(inst)
        if new == "unhealthy":
            self.placement.replace_queued(inst)

    # ---- records -----------------------------------------------------------------------------------
    def event(
        self, kind: str, instance_id: str | None, detail: dict[str, Any], duration_s: float | None = None
    ) -> None:
        self.store.add_event(kind, instance_id=instance_id, detail=detail, duration_s=duration_s)

    def _save_instance(self, inst: Instance) -> None:
        self.store.save_instance(
            inst.id, backend=inst.spec.backend, role=inst.role, state=inst.state, url=inst.spec.url,
            model=inst.model or inst.spec.model,
            capacity_kv_tokens=inst.load.total_kv_tokens if inst.load else None,
            last_load=inst.load.to_dict() if inst.load else None, last_seen=inst.last_seen or None,
            options=shareable_options(inst.spec.options),  # a peer registering it from the table needs them
        )

    def _save_instances_stopped(self) -> None:
        """On shutdown: nobody watches these instances any more (the engines may well run on); a
        restart registers them again."""
        for inst in self.cluster.instances.values():
            self.store.save_instance(inst.id, state="unknown")

    def _finished(self, job: Job) -> None:
        if job.predicted_bucket is not None and job.finish_reason in ("stop", "length"):
            self.live_accuracy.record(job.predicted_bucket, job.completion_tokens)
            snap = self.live_accuracy.snapshot()
            metrics.PREDICTOR_ACCURACY.set(snap.get("accuracy") or 0.0)
            metrics.PREDICTOR_SAMPLES.set(snap.get("n", 0))

    def request_record(self, request_id: str) -> dict[str, Any] | None:
        self.store.flush(timeout=2.0)
        return self.store.get_request(request_id)

    def stats(self) -> dict[str, Any]:
        return {
            "active_requests": self.server.active,
            "instances": len(self.cluster.instances),
            "predictor": {"name": self.settings.predictor, "granularity": self.settings.predictor_granularity,
                          "live": self.live_accuracy.snapshot(),
                          "stored": self.store.predictor_accuracy(self.settings.predictor_granularity)},
            "requests": self.store.request_stats(),
        }


def _import_transformers() -> None:
    from transformers import AutoTokenizer  # noqa: F401


def _live_accuracy(predictor: Any, granularity: int) -> Any:
    from predictor.live import LiveAccuracy

    # The learned predictor's last bucket is open-ended: cap true lengths the same way.
    return LiveAccuracy(granularity, getattr(predictor, "num_buckets", None))


def create_app(
    settings: Settings | None = None, store: Store | None = None, on_ready: Callable[[], None] | None = None
) -> FastAPI:
    settings = settings or Settings.load()
    state = AppState(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(state.store.upgrade)
        await state.leader.join()  # no live process has our replica id: what it left in flight is dead
        # A previous run of this replica that died (SIGKILL, OOM) left requests in flight and
        # instances "healthy" in the store: nobody will finish or watch them now.
        recovered = await asyncio.to_thread(state.store.recover, settings.replica_id, _RESTART_ERROR)
        state.store.start()
        if any(recovered.values()):
            log.warning("recovered from an unclean stop: %s", recovered)
            state.event("recover", None, recovered)
        # Load the tokenizer and the predictor now, off the event loop, not in the first request.
        # Both import transformers, whose lazy names do not resolve thread-safely: two threads
        # importing AutoTokenizer at once can fail ("cannot import name"), so import it first.
        await asyncio.to_thread(_import_transformers)
        await asyncio.to_thread(tls_context)  # every instance's httpx clients share it; built off the loop once
        _, state.predictor = await asyncio.gather(
            state.load_default_builder(),
            asyncio.to_thread(make_predictor, settings.predictor, settings.predictor_granularity),
        )
        state.server.predictor = state.predictor
        state.live_accuracy = _live_accuracy(state.predictor, settings.predictor_granularity)
        state.monitor.on_state_change.append(state._on_state_change)
        state.monitor.on_kv_events.append(
            lambda inst, ev: state.placement.prefixes.apply(inst.id, ev.reset, ev.stored, ev.removed)
        )
        state.monitor.listeners.append(state.on_monitor_tick)
        for spec in settings.instances:
            # Configured engines may still be starting with the orchestrator: longer than an admin call.
            await state.register(spec, max(_STARTUP_REGISTER_TIMEOUT_S, settings.register_timeout_s))
        provider = make_provider(settings.pool_provider, settings, state.healthy_per_role)
        await provider.start(state.pool_ready, state.pool_leaving)
        state.pool_provider = provider
        state.monitor.start()
        await state.leader.tick()  # a lone replica leads from the start, not a renewal later
        state.leader.start()
        state.instance_sync.start()
        planner_job = None
        if settings.plan_auto_interval_s > 0:
            planner_job = AsyncIOScheduler()
            planner_job.add_job(state.auto_plan, "interval", seconds=settings.plan_auto_interval_s, max_instances=1,
                                coalesce=True)  # fmt: skip
            planner_job.start()
        # Start-up made millions of long-lived objects (tokenizer, predictor, torch): keep them out of
        # the collector, whose full passes over them otherwise stall the event loop for 50-200 ms.
        gc.collect()
        gc.freeze()
        # The requests in flight hold thousands of young objects, freed by reference counting (they
        # make no cycles): past the default 700, a young collection ran every ~7 requests under load.
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        if on_ready is not None:
            on_ready()
        yield
        if planner_job is not None:
            planner_job.shutdown(wait=False)
        state.pool_provider = None
        await provider.stop()
        state.monitor.stop()
        await state.instance_sync.stop()
        await state.leader.stop()
        # Peers still drive the instances: only the last replica to stop leaves them "unknown".
        with contextlib.suppress(Exception):
            if not await asyncio.to_thread(state.store.live_replicas, settings.replica_timeout_s):
                state._save_instances_stopped()
        for inst in list(state.cluster.instances.values()):
            await inst.backend.close()
        state.store.close()
        if state.tracing is not None:
            state.tracing.shutdown()  # flushes the spans still batched

    app = HotPathApp(title="tetri", version="0.1.0", lifespan=lifespan)
    app.state.tetri = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if state.tracing is not None:
        app.add_middleware(TraceContextMiddleware)
    hot_routes: dict[str, HotRoute] = {}
    app.include_router(build_router(state, hot_routes), dependencies=api_key_dependencies(settings.api_keys))
    if state.tracing is None and settings.hot_path:  # traced requests take the middleware that traces them
        app.hot_path = lambda stack: HotPath(stack, hot_routes, settings.max_request_body_bytes, settings.api_keys)
    app.include_router(build_admin_router(state))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        healthy = [i.id for i in state.cluster.instances.values() if i.state == "healthy"]
        return {"status": "ok", "instances": len(state.cluster.instances), "healthy": len(healthy)}

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
