"""Pool providers: what starts and stops engine instances for `PUT /admin/pools/{role}`.

A provider owns the *count* of instances per role; the orchestrator owns registration, draining
and placement. A provider reports instances it started (or discovered) through `on_ready` and asks
for them to be drained and deregistered through `on_leaving` before they are stopped, so nothing in
flight is lost. Providers are registered by name in `orchestrator/pools/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from backends.base import Role

POOL_ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")


class ScaleRefused(Exception):
    """This provider cannot scale that pool (answered 409 with the message)."""


@dataclass(frozen=True)
class PoolStatus:
    role: Role
    desired: int  # what was last asked for (or what is running, where nothing was asked)
    ready: int  # instances up and registered
    scalable: bool  # whether PUT /admin/pools/{role} can change it
    detail: str = ""  # e.g. the workload a kubernetes pool scales


@dataclass(frozen=True)
class ReadyInstance:
    """An instance a provider brought up, for the orchestrator to register."""

    url: str
    role: Role
    backend: str
    model: str | None = None
    id: str | None = None


# Callbacks into the orchestrator: register a ready instance; drain and deregister one (by URL)
# before the provider stops it. Both are idempotent.
OnReady = Callable[[ReadyInstance], Awaitable[None]]
OnLeaving = Callable[[str], Awaitable[None]]


class PoolProvider(Protocol):
    name: str

    async def start(self, on_ready: OnReady, on_leaving: OnLeaving) -> None:
        """Begin: discover what runs already and report it through `on_ready`."""
        ...

    async def stop(self) -> None:
        """Stop watching; instances a provider started itself are stopped by their owner (`tetri up`)."""
        ...

    async def pools(self) -> list[PoolStatus]: ...

    async def scale(self, role: Role, replicas: int) -> PoolStatus:
        """Ask for `replicas` instances of `role`; returns at once (instances come up in the
        background and are reported through `on_ready`). Raises ScaleRefused."""
        ...
