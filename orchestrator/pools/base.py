"""Pool providers: what starts and stops engine instances for `PUT /admin/pools/{role}`.

A provider owns the *count* of instances per role; the orchestrator owns registration, draining
and placement. A provider reports instances it started (or discovered) through `on_ready` and asks
for them to be drained and deregistered through `on_leaving` before they are stopped, so nothing in
flight is lost. Providers are registered by name in `orchestrator/pools/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.base import Role

POOL_ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")
# The most replicas one PUT /admin/pools/{role} may ask for (the admin API answers 400 above it).
MAX_REPLICAS = 256


class ScaleRefused(Exception):
    """This provider cannot scale that pool (answered 409 with the message): a static provider, a
    role without a workload, a Kubernetes API that refused the patch."""


class PoolUnavailable(Exception):
    """What the provider drives did not answer (e.g. the Kubernetes API is unreachable): 503 with
    Retry-After; the request may be repeated."""


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
    # Adapter options, as InstanceSpec.options (e.g. an SGLang prefill's bootstrap_port).
    options: Mapping[str, Any] = field(default_factory=dict)


# Callbacks into the orchestrator (AppState.pool_ready / AppState.pool_leaving):
# - OnReady registers the instance through POST /admin/instances' path (URL checks, tokenizer, a
#   health check within register_timeout_s). Idempotent by URL: an instance already registered is
#   left as it is. Raises (APIError, BackendError) when the instance is refused: the provider decides
#   whether to retry.
# - OnLeaving drains the instance registered at that URL (no new work, running work finishes) and
#   deregisters it; it returns once nothing runs there, so the provider may then stop it. A URL that
#   is not registered is a no-op.
OnReady = Callable[[ReadyInstance], Awaitable[None]]
OnLeaving = Callable[[str], Awaitable[None]]


class PoolProvider(Protocol):
    """Built by `orchestrator.pools.make_provider(settings.pool_provider, settings)`; the app calls
    start() in its lifespan, stop() at shutdown, pools()/scale() from GET/PUT /admin/pools."""

    name: str

    async def start(self, on_ready: OnReady, on_leaving: OnLeaving) -> None:
        """Begin: discover what runs already and report it through `on_ready`."""
        ...

    async def stop(self) -> None:
        """Stop watching; instances a provider started itself are stopped by their owner (`tetri up`)."""
        ...

    async def pools(self) -> list[PoolStatus]:
        """One PoolStatus per role of POOL_ROLES, in that order."""
        ...

    async def scale(self, role: Role, replicas: int) -> PoolStatus:
        """Ask for `replicas` instances of `role`; returns at once (instances come up in the
        background and are reported through `on_ready`; leaving ones are drained through `on_leaving`
        first). `replicas` is already checked (0..MAX_REPLICAS). Raises ScaleRefused."""
        ...
