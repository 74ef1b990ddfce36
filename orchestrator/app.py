"""The orchestrator application: wires settings, cluster, monitor, placement, server and store
into one FastAPI app (`create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backends.base import BackendError, Role
from orchestrator import metrics
from orchestrator.admin_api import build_admin_router
from orchestrator.cluster import Cluster, Instance
from orchestrator.config import InstanceSpec, Settings
from orchestrator.errors import install_error_handlers
from orchestrator.monitor import ClusterMonitor
from orchestrator.openai_api import build_router
from orchestrator.placement import Placement
from orchestrator.policies.flip import make_flip_policy
from orchestrator.policies.predictors import make_predictor
from orchestrator.pool_planner import AutoPlanner
from orchestrator.serving import Job, Server
from orchestrator.store import Store
from orchestrator.tokenizer import DEFAULT_MODEL, PromptBuilder

log = logging.getLogger("tetri.app")
_DEFAULT_CONTEXT = 8192


class AppState:
    """Everything the HTTP routes need, in one place."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.cluster = Cluster()
        self.store = store or Store(settings.database_url)
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
        self.max_context = _DEFAULT_CONTEXT
        self._builders: dict[str, PromptBuilder] = {}
        self._flipping: set[str] = set()
        # A plan simulates thousands of requests per candidate (seconds of CPU): one at a time.
        self.planning = asyncio.Lock()
        self.auto_planner = AutoPlanner(self)

    # ---- models and prompts ----------------------------------------------------------------------
    def served_models(self) -> list[str]:
        names = set(self.cluster.models())
        if not names:
            names.add(self.settings.public_model_name)
        return sorted(names)

    def prompt_builder(self, model: str) -> PromptBuilder:
        if model not in self._builders:
            source = self.settings.model if model == self.settings.public_model_name else model
            try:
                self._builders[model] = PromptBuilder(source)
            except Exception as exc:  # noqa: BLE001 - e.g. a GPU model whose tokenizer is not local
                log.warning("no local tokenizer for %s (%s); using %s's", model, exc, DEFAULT_MODEL)
                self._builders[model] = PromptBuilder(DEFAULT_MODEL)
        return self._builders[model]

    # ---- instances ---------------------------------------------------------------------------------
    async def register(self, spec: InstanceSpec, timeout_s: float = 60.0) -> Instance:
        """Health-check an instance before it takes traffic, then record it."""
        started = time.perf_counter()
        if spec.model is None and spec.backend in ("native", "sim"):
            spec = spec.model_copy(update={"model": self.settings.public_model_name})
        inst = self.cluster.add(spec)
        if not await self.monitor.wait_healthy(inst, timeout_s):
            self.cluster.remove(inst.id)
            await inst.backend.close()
            raise BackendError(f"instance at {spec.url} did not become healthy in {timeout_s:.0f}s", status=502)
        with contextlib.suppress(Exception):
            inst.info = await inst.backend.info()
            context = inst.info.get("max_context")
            if isinstance(context, int) and context > 0:
                self.max_context = context
        self._save_instance(inst)
        self.event("register", inst.id, {"url": spec.url, "backend": spec.backend, "role": inst.role},
                   time.perf_counter() - started)
        return inst

    async def deregister(self, inst: Instance) -> dict[str, Any]:
        """Drain (no new work; wait for running work), then forget the instance."""
        started = time.perf_counter()
        inst.state = "draining"
        with contextlib.suppress(BackendError):
            await inst.backend.drain(False)
        await self._wait_idle(inst)
        self.cluster.remove(inst.id)
        self.placement.replace_queued(inst)
        await inst.backend.close()
        self._save_instance(inst)
        duration = time.perf_counter() - started
        self.event("deregister", inst.id, {}, duration)
        return {"id": inst.id, "state": "removed", "drain_s": duration}

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
        self.placement.queues.pop(inst.id, None)
        inst.inflight_prefills = 0
        duration = time.perf_counter() - started
        detail = {"from": old_role, "to": role, **{k: v for k, v in result.items() if k != "role"}}
        self.event("flip", inst.id, detail, duration)
        self._save_instance(inst)
        return {"id": inst.id, "role": role, "changed": True, "duration_s": duration, **detail}

    async def _wait_released(self, inst: Instance, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        # Prefills released to it, and decodes routed to it whose KV has not arrived yet.
        while (inst.inflight_prefills > 0 or inst.reserved_kv_tokens > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _wait_idle(self, inst: Instance, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                load = await inst.backend.load()
            except BackendError:
                return
            if load.running == 0 and load.queued == 0 and inst.inflight_prefills == 0:
                return
            await asyncio.sleep(0.05)

    async def on_monitor_tick(self) -> None:
        self.placement.pump_all()
        for role in ("prefill", "decode", "colocated"):
            for state in ("healthy", "unhealthy", "draining", "flipping"):
                count = sum(1 for i in self.cluster.instances.values() if i.role == role and i.state == state)
                metrics.INSTANCES.labels(role=role, state=state).set(count)
        views = [i.view() for i in self.cluster.instances.values() if i.role in ("prefill", "decode")]
        for decision in self.flip_policy.decide(views, time.monotonic()):
            inst = self.cluster.get(decision.instance_id)
            if inst is not None and inst.id not in self._flipping:
                asyncio.get_running_loop().create_task(self._auto_flip(inst, decision.to_role))

    @property
    def flips_running(self) -> bool:
        return bool(self._flipping)

    async def auto_plan(self) -> None:
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
            last_load=inst.load.to_dict() if inst.load else None,
        )

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
        state.store.start()
        # Load the tokenizer and the predictor now, off the event loop, not in the first request.
        # Both import transformers, whose lazy names do not resolve thread-safely: two threads
        # importing AutoTokenizer at once can fail ("cannot import name"), so import it first.
        await asyncio.to_thread(_import_transformers)
        _, state.predictor = await asyncio.gather(
            asyncio.to_thread(state.prompt_builder, settings.public_model_name),
            asyncio.to_thread(make_predictor, settings.predictor, settings.predictor_granularity),
        )
        state.server.predictor = state.predictor
        state.live_accuracy = _live_accuracy(state.predictor, settings.predictor_granularity)
        state.monitor.on_state_change.append(state._on_state_change)
        state.monitor.listeners.append(state.on_monitor_tick)
        for spec in settings.instances:
            await state.register(spec)
        state.monitor.start()
        planner_job = None
        if settings.plan_auto_interval_s > 0:
            planner_job = AsyncIOScheduler()
            planner_job.add_job(state.auto_plan, "interval", seconds=settings.plan_auto_interval_s, max_instances=1,
                                coalesce=True)  # fmt: skip
            planner_job.start()
        if on_ready is not None:
            on_ready()
        yield
        if planner_job is not None:
            planner_job.shutdown(wait=False)
        state.monitor.stop()
        for inst in list(state.cluster.instances.values()):
            await inst.backend.close()
        state.store.close()

    app = FastAPI(title="tetri", version="0.1.0", lifespan=lifespan)
    app.state.tetri = state
    install_error_handlers(app)
    app.include_router(build_router(state))
    app.include_router(build_admin_router(state))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        healthy = [i.id for i in state.cluster.instances.values() if i.state == "healthy"]
        return {"status": "ok", "instances": len(state.cluster.instances), "healthy": len(healthy)}

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
