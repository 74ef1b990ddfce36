"""The static provider: instances are registered by hand (POST /admin/instances) or listed in the
settings; nothing here starts or stops one, so every scale request is refused (409)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from backends.base import Role
from orchestrator.pools.base import POOL_ROLES, OnLeaving, OnReady, PoolStatus, ScaleRefused

REFUSAL = ("pool_provider is static: register instances with POST /admin/instances, or run with "
           "pool_provider=local or kubernetes")  # fmt: skip


class StaticProvider:
    name = "static"

    def __init__(self, registered: Callable[[], Mapping[Role, int]]) -> None:
        self._registered = registered

    async def start(self, on_ready: OnReady, on_leaving: OnLeaving) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def pools(self) -> list[PoolStatus]:
        counts = self._registered()
        return [
            PoolStatus(
                role,
                desired=counts.get(role, 0),
                ready=counts.get(role, 0),
                scalable=False,
                detail="registered by hand",
            )  # fmt: skip
            for role in POOL_ROLES
        ]

    async def scale(self, role: Role, replicas: int) -> PoolStatus:
        raise ScaleRefused(REFUSAL)
