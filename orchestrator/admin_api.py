"""Admin REST API (bearer token from TETRI_ADMIN_TOKEN): instances, requests, flips, drains, stats."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from backends.base import BackendError, Role
from orchestrator.config import BackendKind, InstanceSpec
from orchestrator.errors import APIError


class RegisterBody(BaseModel):
    url: str
    backend: BackendKind = "native"
    role: Role = "colocated"
    model: str | None = None
    id: str | None = None
    options: dict[str, Any] = {}


class FlipBody(BaseModel):
    role: Role | None = None


def build_admin_router(app_state: Any) -> APIRouter:
    def require_token(request: Request) -> None:
        token = app_state.settings.admin_token
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token or not given or not hmac.compare_digest(given, token):
            raise APIError(401, "admin API needs 'Authorization: Bearer <TETRI_ADMIN_TOKEN>'",
                           "authentication_error", code="invalid_admin_token")

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_token)])

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
    async def events(kind: str | None = None, limit: int = 100) -> dict[str, Any]:
        return {"events": await asyncio.to_thread(app_state.store.list_events, kind=kind, limit=limit)}

    @router.get("/stats")
    async def stats() -> dict[str, Any]:
        return await asyncio.to_thread(app_state.stats)

    return router
