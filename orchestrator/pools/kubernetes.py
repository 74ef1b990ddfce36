"""The kubernetes provider: one workload (Deployment or StatefulSet) per role, scaled through its
`scale` subresource; its pods found by label selector with a watch and registered once Ready,
drained and deregistered once terminating (deletionTimestamp set) or gone.

The watch resumes from the last resourceVersion it saw when the API server ends it (it does, every
few minutes); when that version has expired (410 Gone) the pods are listed again and the difference
applied, so an event missed in between is never lost. Least privilege: get/list/watch pods, get and
patch the named workloads' scale (deploy/k8s/base/rbac.yaml).

Scaling down: Kubernetes picks the pods to delete. A pod's deletionTimestamp is set before its
containers get SIGTERM, and the engine pods' preStop hook holds them that long, so the orchestrator
sees the pod terminating, stops sending it work and waits for what runs there (within
terminationGracePeriodSeconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.core.exceptions import ApiError
from lightkube.models.autoscaling_v1 import Scale
from lightkube.resources.apps_v1 import Deployment, StatefulSet
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from backends.base import Role
from orchestrator.config import K8sPool, Settings
from orchestrator.pools.base import (
    POOL_ROLES,
    OnLeaving,
    OnReady,
    PoolStatus,
    PoolUnavailable,
    ReadyInstance,
    ScaleRefused,
)

log = logging.getLogger("tetri.pools.kubernetes")

_SCALE = {"deployment": Deployment.Scale, "statefulset": StatefulSet.Scale}
# The API server ends a watch after timeoutSeconds (and on its own, every 30-60 min): resumed then.
_WATCH_TIMEOUT_S = 290
_MAX_BACKOFF_S = 30.0
_TRANSPORT_ERRORS = (httpx2.HTTPError, OSError)


@dataclass
class _Pod:
    name: str
    role: Role
    url: str
    registering: asyncio.Task[None] | None = None
    registered: bool = False


def _is_gone(exc: BaseException) -> bool:
    """410 Gone: the resourceVersion we resume from has been compacted away."""
    if isinstance(exc, ApiError):
        return exc.status.code == 410
    return isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 410


def pod_ready(pod: Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def pod_leaving(pod: Pod) -> bool:
    phase = pod.status.phase if pod.status else None
    return pod.metadata.deletionTimestamp is not None or phase in ("Succeeded", "Failed")


def container_port(pod: Pod, wanted: int | str | None) -> int | None:
    """The engine's port: a number as given, a named container port, else the first one declared."""
    if isinstance(wanted, int):
        return wanted
    for container in (pod.spec.containers if pod.spec else None) or []:
        for port in container.ports or []:
            if wanted is None or port.name == wanted:
                return port.containerPort
    return None


class KubernetesProvider:
    name = "kubernetes"

    def __init__(self, settings: Settings, client: AsyncClient | None = None) -> None:
        self._settings = settings
        self._pools: dict[Role, K8sPool] = dict(settings.k8s_pools)
        self._client = client
        self._namespace = settings.k8s_namespace
        # Pods with the role label, whatever their value: each pool's pods are told apart by it.
        self._labels: dict[str, str | None] = {**settings.k8s_match_labels, settings.k8s_role_label: None}
        self._pods: dict[str, _Pod] = {}  # by pod uid
        self._leaving: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._on_ready: OnReady | None = None
        self._on_leaving: OnLeaving | None = None
        self.resource_version: str | None = None  # where the watch resumes from
        self.relists = 0  # lists made: the first, then one per expired watch

    # ---- PoolProvider -------------------------------------------------------------------------------
    async def start(self, on_ready: OnReady, on_leaving: OnLeaving) -> None:
        if self._client is None:
            url = self._settings.k8s_api_url
            # k8s_api_url: an API server reached without credentials (`kubectl proxy`, a test's fake).
            config = (KubeConfig.from_one(cluster=Cluster(server=url), user=User(), namespace=self._namespace)
                      if url else KubeConfig.from_env())  # fmt: skip
            self._client = AsyncClient(config, namespace=self._namespace, field_manager="tetri")
        self._namespace = self._namespace or self._client.namespace
        self._on_ready, self._on_leaving = on_ready, on_leaving
        self._task = asyncio.create_task(self._run(), name="k8s-pod-watch")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._leaving) if t is not None]
        tasks += [p.registering for p in self._pods.values() if p.registering is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._client is not None:
            await self._client.close()

    async def pools(self) -> list[PoolStatus]:
        statuses = []
        for role in POOL_ROLES:
            ready = sum(1 for p in self._pods.values() if p.role == role and p.registered)
            pool = self._pools.get(role)
            if pool is None:
                statuses.append(PoolStatus(role, ready, ready, False, f"no workload: set k8s_pools.{role}"))
                continue
            try:
                scale = await self._get_scale(pool)
            except ApiError as exc:
                statuses.append(PoolStatus(role, ready, ready, False, f"{pool.workload}: {exc.status.message}"))
                continue
            statuses.append(PoolStatus(role, (scale.spec.replicas if scale.spec else 0) or 0, ready, True,
                                       pool.workload))  # fmt: skip
        return statuses

    async def scale(self, role: Role, replicas: int) -> PoolStatus:
        pool = self._pools.get(role)
        if pool is None:
            raise ScaleRefused(f"no Kubernetes workload for the {role} pool: set k8s_pools.{role}")
        kind, name = pool.workload.split("/", 1)
        try:
            current = await self._get_scale(pool)
            if (current.spec.replicas if current.spec else None) != replicas:
                # What `kubectl scale` sends: a merge patch of the scale subresource.
                await self._api().patch(_SCALE[kind], name, {"spec": {"replicas": replicas}},
                                        namespace=self._namespace, patch_type=PatchType.MERGE)  # fmt: skip
        except ApiError as exc:
            if exc.status.code is not None and exc.status.code >= 500:
                raise PoolUnavailable(
                    f"the Kubernetes API failed to scale {pool.workload}: {exc.status.message}"
                ) from exc
            raise ScaleRefused(f"Kubernetes refused to scale {pool.workload}: {exc.status.message}") from exc
        except _TRANSPORT_ERRORS as exc:
            raise PoolUnavailable(f"the Kubernetes API is unreachable: {exc}") from exc
        ready = sum(1 for p in self._pods.values() if p.role == role and p.registered)
        log.info("scaled %s to %d replicas", pool.workload, replicas)
        return PoolStatus(role, replicas, ready, True, pool.workload)

    # ---- the API ------------------------------------------------------------------------------------
    def _api(self) -> AsyncClient:
        if self._client is None:
            raise PoolUnavailable("the kubernetes pool provider is not started")
        return self._client

    async def _get_scale(self, pool: K8sPool) -> Scale:
        kind, name = pool.workload.split("/", 1)
        try:
            return await self._api().get(_SCALE[kind], name, namespace=self._namespace)
        except ApiError as exc:
            if exc.status.code is not None and exc.status.code >= 500:
                raise PoolUnavailable(f"the Kubernetes API failed: {exc.status.message}") from exc
            raise
        except _TRANSPORT_ERRORS as exc:
            raise PoolUnavailable(f"the Kubernetes API is unreachable: {exc}") from exc

    # ---- the pod watch ------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self.resource_version is None:
                    await self._relist()
                await self._watch()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the watch must outlive any one failure
                if _is_gone(exc):
                    log.info("pod watch expired at resourceVersion %s: listing again", self.resource_version)
                    self.resource_version = None
                    continue
                failures += 1
                delay = min(_MAX_BACKOFF_S, 0.25 * 2**failures)
                log.warning("kubernetes pod watch failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _relist(self) -> None:
        """List the pods, register the Ready ones, let go of those we knew that are gone; the watch
        then starts from the list's resourceVersion."""
        self.relists += 1
        listing = self._api().list(Pod, namespace=self._namespace, labels=self._labels)
        seen: set[str] = set()
        async for pod in listing:
            if pod.metadata and pod.metadata.uid:
                seen.add(pod.metadata.uid)
                self._observe("ADDED", pod)
        for uid in [uid for uid in self._pods if uid not in seen]:
            self._leave(uid)
        self.resource_version = listing.resourceVersion

    async def _watch(self) -> None:
        """Follow pod events from self.resource_version until the server ends the stream."""
        events = self._api().watch(Pod, namespace=self._namespace, labels=self._labels,
                                   resource_version=self.resource_version, server_timeout=_WATCH_TIMEOUT_S)  # fmt: skip
        # When the server ends the stream (timeoutSeconds, a restart), lightkube asks again from the
        # last resourceVersion it saw; errors (410 included) come out here.
        async for kind, pod in events:
            if pod.metadata is not None and pod.metadata.resourceVersion:
                self.resource_version = pod.metadata.resourceVersion
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._observe(kind, pod)

    def _observe(self, kind: str, pod: Pod) -> None:
        meta = pod.metadata
        if meta is None or meta.uid is None:
            return
        if kind == "DELETED" or pod_leaving(pod):
            self._leave(meta.uid)
            return
        known = self._pods.get(meta.uid)
        if known is not None or not pod_ready(pod) or not (pod.status and pod.status.podIP):
            return  # registered (or being registered); or not ready yet (the monitor watches the rest)
        role = (meta.labels or {}).get(self._settings.k8s_role_label)
        pool = self._pools.get(role) if role in POOL_ROLES else None  # type: ignore[arg-type]
        if pool is None:
            log.warning("pod %s has %s=%r: no k8s_pools entry for that role, not registered",
                        meta.name, self._settings.k8s_role_label, role)  # fmt: skip
            return
        port = container_port(pod, pool.port)
        if port is None:
            log.warning("pod %s declares no container port %s: not registered", meta.name, pool.port or "")
            return
        host = pod.status.podIP
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        entry = _Pod(name=meta.name or meta.uid, role=role, url=url)  # type: ignore[arg-type]
        self._pods[meta.uid] = entry
        entry.registering = asyncio.create_task(self._register(entry, pool), name=f"k8s-register-{entry.name}")

    async def _register(self, entry: _Pod, pool: K8sPool) -> None:
        """Register a Ready pod; retried while it stays Ready (its id may still be draining under an
        earlier pod of the same name, or its engine not answer yet)."""
        assert self._on_ready is not None
        ready = ReadyInstance(url=entry.url, role=entry.role, backend=pool.backend, model=pool.model, id=entry.name,
                              options=pool.options)  # fmt: skip
        delay = 0.5
        while True:
            try:
                await self._on_ready(ready)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused (unhealthy, conflict): try again
                log.warning(
                    "registering pod %s at %s failed (%s); retrying in %.1fs", entry.name, entry.url, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(_MAX_BACKOFF_S, delay * 2)
                continue
            entry.registered = True
            log.info("pod %s registered as a %s instance at %s", entry.name, entry.role, entry.url)
            return

    def _leave(self, uid: str) -> None:
        entry = self._pods.pop(uid, None)
        if entry is None:
            return
        task = asyncio.create_task(self._drain(entry), name=f"k8s-drain-{entry.name}")
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _drain(self, entry: _Pod) -> None:
        assert self._on_leaving is not None
        if entry.registering is not None and not entry.registering.done():
            entry.registering.cancel()  # a registration in flight leaves nothing behind
            with contextlib.suppress(BaseException):
                await entry.registering
        try:
            await self._on_leaving(entry.url)
        except Exception:  # noqa: BLE001 - the pod goes anyway; the monitor notices what is left
            log.exception("draining pod %s at %s failed", entry.name, entry.url)
            return
        log.info("pod %s (%s) drained and deregistered", entry.name, entry.url)
