"""Admin REST API (bearer token from TETRI_ADMIN_TOKEN): instances, requests, flips, drains, stats."""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field, StrictInt

from backends.base import BackendError, Role
from orchestrator.config import BackendKind, InstanceSpec
from orchestrator.errors import APIError
from orchestrator.pool_planner import flip_to_split, pd_pool, recommend_for_traffic
from orchestrator.pools.base import MAX_REPLICAS, POOL_ROLES, PoolProvider, PoolStatus, PoolUnavailable, ScaleRefused


class RegisterBody(BaseModel):
    url: str
    backend: BackendKind = "native"
    role: Role = "colocated"
    model: str | None = None
    id: str | None = None
    options: dict[str, Any] = {}


class FlipBody(BaseModel):
    role: Role | None = None


class ScaleBody(BaseModel):
    replicas: StrictInt = Field(ge=0, le=MAX_REPLICAS)


def build_admin_router(app_state: Any) -> APIRouter:
    def require_token(request: Request) -> None:
        token = app_state.settings.admin_token
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        # Bytes, not str: compare_digest refuses non-ASCII str (a 500), and headers arrive as latin-1.
        if not token or not given or not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            raise APIError(
                401,
                "admin API needs 'Authorization: Bearer <TETRI_ADMIN_TOKEN>'",
                "authentication_error",
                code="invalid_admin_token",
            )

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_token)])
    # A plan simulates thousands of requests per candidate (seconds of CPU): one at a time.
    planning = app_state.planning

    async def planned(
        window_s: float, objective: str | None, profile: str | None, instances: int | None, ttft_slo_ms: float | None
    ) -> dict[str, Any]:
        objective = objective or app_state.settings.plan_objective
        slo = ttft_slo_ms if ttft_slo_ms is not None else app_state.settings.plan_ttft_slo_ms
        _check_plan_args(window_s, objective, profile or app_state.settings.plan_profile, instances, slo)
        if planning.locked():
            raise APIError(429, "a plan is already being computed; retry shortly", "rate_limit_error",
                           code="plan_in_progress", retry_after=5)  # fmt: skip
        async with planning:
            return await asyncio.to_thread(
                recommend_for_traffic, app_state, window_s, objective, profile or app_state.settings.plan_profile,
                instances, slo,
            )  # fmt: skip

    def instance_or_404(instance_id: str):
        inst = app_state.cluster.get(instance_id)
        if inst is None:
            raise APIError(404, f"no instance {instance_id!r}", code="instance_not_found")
        return inst

    @router.get("/instances")
    async def list_instances() -> dict[str, Any]:
        return {"instances": [i.describe() for i in app_state.cluster.instances.values()]}

    @router.post("/instances", status_code=201)
    async def register(body: RegisterBody) -> dict[str, Any]:
        spec = InstanceSpec(**body.model_dump())
        try:
            inst = await app_state.register(spec)
        except ValueError as exc:
            raise APIError(409, str(exc), code="instance_conflict") from exc
        except BackendError as exc:
            raise APIError(exc.status if 400 <= exc.status < 500 else 502, str(exc), code="instance_unhealthy") from exc
        return inst.describe()

    @router.delete("/instances/{instance_id}")
    async def deregister(instance_id: str) -> dict[str, Any]:
        inst = instance_or_404(instance_id)
        return await app_state.deregister(inst)

    @router.post("/instances/{instance_id}/drain")
    async def drain(instance_id: str, accepting: bool = False) -> dict[str, Any]:
        inst = instance_or_404(instance_id)
        started = time.perf_counter()
        try:
            result = await inst.backend.drain(accepting)
        except BackendError as exc:
            raise APIError(exc.status if exc.status < 500 else 502, str(exc)) from exc
        inst.state = "healthy" if accepting else "draining"
        app_state.event("drain" if not accepting else "undrain", inst.id, result, time.perf_counter() - started)
        return {"id": inst.id, "state": inst.state, **result}

    @router.post("/instances/{instance_id}/flip")
    async def flip(instance_id: str, body: FlipBody | None = None) -> dict[str, Any]:
        inst = instance_or_404(instance_id)
        target = (body.role if body and body.role else None) or ("decode" if inst.role == "prefill" else "prefill")
        try:
            return await app_state.flip(inst, target)
        except BackendError as exc:
            raise APIError(exc.status if exc.status < 500 else 502, str(exc), code="flip_failed") from exc

    @router.get("/requests/{request_id}")
    async def get_request(request_id: str) -> dict[str, Any]:
        row = await asyncio.to_thread(app_state.request_record, request_id)
        if row is None:
            raise APIError(404, f"no request {request_id!r}", code="request_not_found")
        return row

    @router.get("/events")
    async def events(kind: str | None = None, limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
        return {"events": await asyncio.to_thread(app_state.store.list_events, kind=kind, limit=limit)}

    @router.get("/plan")
    async def plan(
        window_s: float = 900.0,
        objective: str | None = None,
        profile: str | None = None,
        instances: int | None = None,
        ttft_slo_ms: float | None = None,
    ) -> dict[str, Any]:
        """The prefill:decode split (P = 0: every request co-located) the recent traffic calls for,
        simulated on the deployment's timing profile. Advice only: apply it with /instances/{id}/flip.
        `objective=slo`: the least mean JCT whose p99 TTFT meets `ttft_slo_ms` (default: the
        deployment's `plan_ttft_slo_ms`)."""
        return await planned(window_s, objective, profile, instances, ttft_slo_ms)

    @router.post("/plan/apply")
    async def apply_plan(
        window_s: float = 900.0,
        objective: str | None = None,
        profile: str | None = None,
        ttft_slo_ms: float | None = None,
    ) -> dict[str, Any]:
        """Plan the prefill/decode pools (co-located instances stay as they are) and flip instances,
        one at a time, until the pools have the recommended split."""
        pool = pd_pool(app_state)
        if not pool:
            raise APIError(409, "no healthy prefill or decode instances to divide", code="no_instances")
        plan = await planned(window_s, objective, profile, len(pool), ttft_slo_ms)
        flips = await flip_to_split(app_state, plan["recommended"]["prefill"])
        return {**plan, "flips": flips}

    def provider_or_503() -> PoolProvider:
        provider = app_state.pool_provider
        if provider is None:  # the lifespan has not started it (or has stopped it)
            raise APIError(503, "the pool provider is not running", "server_error", code="pools_unavailable",
                           retry_after=5)  # fmt: skip
        return provider

    def pool_view(status: PoolStatus) -> dict[str, Any]:
        registered = sum(1 for i in app_state.cluster.instances.values()
                         if i.role == status.role and i.state == "healthy")  # fmt: skip
        return {"role": status.role, "desired": status.desired, "ready": status.ready, "registered": registered,
                "scalable": status.scalable, "detail": status.detail}  # fmt: skip

    @router.get("/pools")
    async def pools() -> dict[str, Any]:
        """Each pool's size: `desired` (asked for), `ready` (up, as the provider sees them),
        `registered` (healthy instances of that role taking traffic here), whether it scales."""
        provider = provider_or_503()
        try:
            statuses = await provider.pools()
        except PoolUnavailable as exc:
            raise APIError(503, str(exc), "server_error", code="pools_unavailable", retry_after=5) from exc
        return {"provider": provider.name, "pools": [pool_view(s) for s in statuses]}

    @router.put("/pools/{role}")
    async def scale_pool(role: str, body: ScaleBody) -> dict[str, Any]:
        """Ask for `replicas` instances in the pool; returns at once: new instances are registered
        once ready, leaving ones drained first (watch GET /admin/pools)."""
        if role not in POOL_ROLES:
            raise APIError(404, f"no pool {role!r}; pools: {', '.join(POOL_ROLES)}", code="pool_not_found")
        provider = provider_or_503()
        try:
            status = await provider.scale(role, body.replicas)
        except ScaleRefused as exc:
            raise APIError(409, str(exc), code="scale_refused") from exc
        except PoolUnavailable as exc:
            raise APIError(503, str(exc), "server_error", code="pools_unavailable", retry_after=5) from exc
        app_state.event("pool_scale", None, {"role": role, "replicas": body.replicas, "provider": provider.name})
        return {"provider": provider.name, **pool_view(status)}

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        return await asyncio.to_thread(app_state.stats)

    return router


_MAX_PLAN_INSTANCES = 512  # a plan simulates every instance: bound the work one request can ask for


def _check_plan_args(window_s: float, objective: str, profile: str, instances: int | None, ttft_slo_ms: float) -> None:
    from backends.engines.simulated.profiles import profile_names
    from orchestrator.sim.config import OBJECTIVES

    if objective not in OBJECTIVES:
        raise APIError(400, f"objective must be one of {', '.join(OBJECTIVES)}", param="objective")
    if profile not in profile_names():
        raise APIError(400, f"unknown profile {profile!r}; known: {', '.join(profile_names())}", param="profile")
    if not window_s > 0:
        raise APIError(400, "window_s must be positive", param="window_s")
    if not 0 < ttft_slo_ms < math.inf:
        raise APIError(400, "ttft_slo_ms must be a positive number of milliseconds", param="ttft_slo_ms")
    if instances is not None and not 1 <= instances <= _MAX_PLAN_INSTANCES:
        raise APIError(400, f"instances must be between 1 and {_MAX_PLAN_INSTANCES}", param="instances")
