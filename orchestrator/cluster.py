"""The orchestrator's registry of engine instances and their latest load."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import httpx

from backends.base import Backend, LoadReport, Role
from backends.http import PoolLimits
from orchestrator.config import InstanceSpec
from orchestrator.policies.ledger import KVLedger
from orchestrator.policies.types import InstanceView

InstanceState = Literal["starting", "healthy", "unhealthy", "draining", "flipping", "removed"]


def check_url(url: str) -> str | None:
    """Why an instance URL is unusable (None: it is fine): http(s) with a host and a valid port, at
    most 512 characters (the store's column)."""
    if len(url) > 512:
        return "url is longer than 512 characters"
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        return f"url is malformed: {exc}"
    if parsed.scheme not in ("http", "https"):
        return "url must start with http:// or https://"
    if not parsed.host:
        return "url has no host"
    if port is not None and not 0 < port < 65536:
        return f"url has an invalid port {port}"
    return None


def url_key(url: str) -> tuple[str, str, int | None, str]:
    """What makes two instance URLs the same engine: scheme, host, port (default filled in) and path
    without a trailing slash."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return ("", url, None, "")
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return (u.scheme, u.host.lower(), port, u.path.rstrip("/"))


def make_backend(spec: InstanceSpec, instance_id: str, pool: PoolLimits | None = None) -> Backend:
    """The adapter for an instance spec; adapters for GPU engines are imported lazily."""
    if spec.backend in ("native", "sim"):
        from backends.worker import WorkerBackend

        return WorkerBackend(spec.url, instance_id, spec.role, spec.model, kind=spec.backend, pool=pool)
    if spec.backend == "sglang":
        from backends.sglang import SGLangBackend

        return SGLangBackend(spec.url, instance_id, spec.role, spec.model, pool=pool, **spec.options)
    if spec.backend == "tensorrt-llm":
        from backends.tensorrt_llm import TensorRTLLMBackend

        return TensorRTLLMBackend(spec.url, instance_id, spec.role, spec.model, **spec.options)
    raise ValueError(f"unknown backend {spec.backend!r}")


@dataclass
class Instance:
    id: str
    spec: InstanceSpec
    backend: Backend
    state: InstanceState = "starting"
    load: LoadReport | None = None
    last_seen: float = 0.0
    failures: int = 0
    # KV promised to requests routed here that the engine's load report may not show yet.
    kv: KVLedger = field(default_factory=KVLedger)
    # Prompts released to this instance's engine whose first token is not back (our view of its
    # backlog): how many, and their prompt tokens.
    inflight_prefills: int = 0
    inflight_prefill_tokens: int = 0
    model: str = ""
    info: dict[str, object] = field(default_factory=dict)

    @property
    def reserved_kv_tokens(self) -> int:
        return self.kv.total

    @property
    def role(self) -> Role:
        return self.backend.role

    @property
    def usable(self) -> bool:
        return self.state == "healthy"

    def view(self) -> InstanceView:
        load = self.load or LoadReport(role=self.role)
        return InstanceView(
            id=self.id,
            role=self.role,
            total_kv_tokens=load.total_kv_tokens,
            free_kv_tokens=load.free_kv_tokens,
            healthy=self.state == "healthy",
            accepting=load.accepting and self.state == "healthy",
            queued_prompt_tokens=load.queued_prompt_tokens,
            running_prompt_tokens=load.running_prompt_tokens,
            running=load.running,
            queued=load.queued,
            heavy_decodes=load.heavy_decodes,
            light_decodes=load.light_decodes,
            decode_remaining=tuple(load.decode_remaining),
            reserved_kv_tokens=self.reserved_kv_tokens,
            chunk_tokens=load.chunk_size,
        )

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "role": self.role,
            "backend": self.spec.backend,
            "url": self.spec.url,
            "model": self.model or self.spec.model,
            "state": self.state,
            "last_seen": self.last_seen,
            "last_load": {k: v for k, v in self.load.to_dict().items() if k != "kv_events"} if self.load else None,
            "prefix_cache": self.prefix_cache(),
        }

    def prefix_cache(self) -> dict[str, float | int] | None:
        """Cache occupancy and hit rate as the engine reports them (None: no prefix cache there)."""
        load = self.load
        if load is None or (load.cached_blocks == 0 and load.prefix_query_tokens == 0):
            return None
        queried = load.prefix_query_tokens
        return {
            "cached_blocks": load.cached_blocks,
            "hit_rate": load.prefix_hit_tokens / queried if queried else 0.0,
            "hit_tokens": load.prefix_hit_tokens,
            "query_tokens": queried,
        }


class Cluster:
    def __init__(self, pool: PoolLimits | None = None) -> None:
        self.instances: dict[str, Instance] = {}
        self.pool = pool  # connection limits of every instance's adapter

    def add(self, spec: InstanceSpec) -> Instance:
        """Create and attach an instance at once (no health check: tests and fakes)."""
        return self.attach(self.create(spec))

    def create(self, spec: InstanceSpec) -> Instance:
        """An instance for `spec`, not yet in the cluster: the monitor, placement and the model list
        see it only once `attach`ed (after its health check)."""
        instance_id = spec.id or f"{spec.role}-{uuid.uuid4().hex[:6]}"
        if instance_id in self.instances:
            raise ValueError(f"instance {instance_id!r} already registered")
        return Instance(instance_id, spec, make_backend(spec, instance_id, self.pool), model=spec.model or "")

    def attach(self, inst: Instance) -> Instance:
        if inst.id in self.instances:
            raise ValueError(f"instance {inst.id!r} already registered")
        self.instances[inst.id] = inst
        return inst

    def by_url(self, url: str) -> Instance | None:
        key = url_key(url)
        return next((i for i in self.instances.values() if url_key(i.spec.url) == key), None)

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    def remove(self, instance_id: str) -> Instance | None:
        inst = self.instances.pop(instance_id, None)
        if inst is not None:
            inst.state = "removed"
        return inst

    def usable(self, role: Role, model: str | None = None, backend: str | None = None) -> list[Instance]:
        return [
            i for i in self.instances.values()
            if i.usable and i.role == role and (model is None or not i.model or i.model == model)
            and (backend is None or i.spec.backend == backend)
        ]

    def backends(self, model: str | None = None) -> set[str]:
        return {i.spec.backend for i in self.instances.values() if i.usable and (model is None or i.model == model)}

    def models(self) -> list[str]:
        return sorted({i.model for i in self.instances.values() if i.model})

    def mark_seen(self, inst: Instance, load: LoadReport) -> None:
        inst.load = load
        inst.last_seen = time.time()
        inst.failures = 0
