"""Pool providers (static, local, kubernetes): see base.py. `make_provider` builds one by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from backends.base import Role
from orchestrator.config import Settings
from orchestrator.pools.base import PoolProvider
from orchestrator.pools.static import StaticProvider

PROVIDERS = ("static", "local", "kubernetes")


def make_provider(
    name: str, settings: Settings, registered: Callable[[], Mapping[Role, int]] | None = None
) -> PoolProvider:
    """The provider called `name`. `registered` counts the healthy registered instances per role
    (what the static provider reports). `local` and `kubernetes` are imported only when chosen
    (the Kubernetes client is an optional dependency)."""
    if name == "static":
        return StaticProvider(registered or dict)
    if name == "local":
        try:
            from orchestrator.pools.local import LocalProvider
        except ModuleNotFoundError as exc:
            if exc.name != "orchestrator.pools.local":
                raise
            raise ValueError("pool_provider=local is not available in this build (orchestrator/pools/local.py "
                             "is missing)") from exc  # fmt: skip
        return LocalProvider(settings)
    if name == "kubernetes":
        try:
            from orchestrator.pools.kubernetes import KubernetesProvider
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("lightkube"):
                raise
            raise ValueError("pool_provider=kubernetes needs the Kubernetes client: pip install lightkube") from exc
        return KubernetesProvider(settings)
    raise ValueError(f"unknown pool_provider {name!r}; known: {', '.join(PROVIDERS)}")
