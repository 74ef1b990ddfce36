"""The `local` pool provider: built-in engine workers (`tetri worker` processes) on this machine.

`scale(role, n)` starts the workers a pool lacks, each reported through `on_ready` once its
/health answers (in the background), or picks the workers a pool has too many of (those not ready
yet first, then the least loaded, the newest of equals) and, for each, calls `on_leaving` (the
orchestrator drains and deregisters it: nothing in flight is lost) and only then stops its process.

The workers live in the process-wide `Fleet` (`orchestrator.launcher.process_fleet`): the workers
`tetri up` started before the app count as members of their pools, and `up` stops them all at exit.
A worker's pool is its current role, read from its /health, since flips move workers between pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from backends.base import Role
from backends.http import tls_context
from orchestrator.cluster import url_key
from orchestrator.config import Settings
from orchestrator.launcher import Fleet, WorkerProcess, process_fleet
from orchestrator.pools.base import POOL_ROLES, OnLeaving, OnReady, PoolStatus, ReadyInstance, ScaleRefused

log = logging.getLogger("tetri.pools.local")
_PROBE_TIMEOUT_S = 2.0
_POLL_S = 0.02  # /health polls of a starting worker: it takes traffic at most this much after it is ready
_WATCH_S = 1.0  # how often the pools are reconciled: flips followed, dead workers replaced

MemberState = Literal["starting", "ready", "leaving"]


@dataclass
class Member:
    """One worker of a pool, as the provider sees it."""

    worker: WorkerProcess
    id: str
    role: Role  # its current role: flips change it
    state: MemberState = "starting"
    ready_at: float | None = None  # monotonic: when /health first answered
    healthy: bool = False  # /health answered once: on_ready may have registered it
    bring_up: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.worker.url


class LocalProvider:
    name = "local"

    def __init__(self, settings: Settings, fleet: Fleet | None = None) -> None:
        self.settings = settings
        self.fleet = fleet if fleet is not None else process_fleet()
        self.members: list[Member] = []
        self.stopped: deque[Member] = deque(maxlen=64)  # the last workers stopped: what ran, when it ended
        self._desired: dict[Role, int] = {}
        self._next_index = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one scale decision at a time
        self._on_ready: OnReady | None = None
        self._on_leaving: OnLeaving | None = None
        self._http: httpx.AsyncClient | None = None

    # ---- PoolProvider --------------------------------------------------------------------------
    async def start(self, on_ready: OnReady, on_leaving: OnLeaving) -> None:
        """Adopt the fleet's running workers (`tetri up`'s); report those the app does not register
        from `settings.instances` itself, once they answer /health."""
        self._on_ready, self._on_leaving = on_ready, on_leaving
        self._http = httpx.AsyncClient(timeout=_PROBE_TIMEOUT_S, verify=tls_context())
        configured = {url_key(spec.url): spec for spec in self.settings.instances}
        for worker in list(self.fleet.workers):
            spec = configured.get(url_key(worker.url))
            member = Member(worker, spec.id if spec and spec.id else self._new_id(worker.role), worker.role)
            self.members.append(member)
            if spec is not None:  # registered by the app from its configuration
                member.state, member.healthy, member.ready_at = "ready", True, time.monotonic()
            else:
                self._start_bring_up(member)
        # What runs now is what is asked for, until a PUT says otherwise.
        self._desired = {role: len(self._active(role)) for role in POOL_ROLES}
        self._spawn(self._watch())

    async def stop(self) -> None:
        """Stop the background work; the processes stay with their owner (`tetri up`, or the
        process fleet's exit handler)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def pools(self) -> list[PoolStatus]:
        await self._refresh()
        return [self._status(role) for role in POOL_ROLES]

    async def scale(self, role: Role, replicas: int) -> PoolStatus:
        if role not in POOL_ROLES:
            raise ScaleRefused(f"unknown pool {role!r}: one of {', '.join(POOL_ROLES)}")
        limit = self.settings.local_max_workers
        if replicas < 0 or replicas > limit:
            raise ScaleRefused(f"the local provider runs 0 to {limit} workers per pool (local_max_workers), "
                               f"not {replicas}")  # fmt: skip
        if self._on_ready is None:
            raise ScaleRefused("the local provider has not started")
        async with self._lock:
            await self._refresh()
            active = self._active(role)
            self._desired[role] = replicas
            if replicas > len(active):
                for _ in range(replicas - len(active)):
                    await self._launch(role)
            elif replicas < len(active):
                for member in await self._pick_leavers(active, len(active) - replicas):
                    member.state = "leaving"
                    self._spawn(self._retire(member))
            return self._status(role)

    # ---- members -------------------------------------------------------------------------------
    def _active(self, role: Role) -> list[Member]:
        return [m for m in self.members if m.role == role and m.state != "leaving"]

    def _status(self, role: Role) -> PoolStatus:
        active = self._active(role)
        ready = sum(1 for m in active if m.state == "ready")
        s = self.settings
        return PoolStatus(role, self._desired.get(role, len(active)), ready, scalable=True,
                          detail=f"{s.local_worker_backend} workers of {s.model} on this machine")  # fmt: skip

    def _new_id(self, role: Role) -> str:
        # `tetri up` names its workers <role>-<index in its fleet>; go on from there.
        self._next_index = max(self._next_index, len(self.fleet.workers))
        iid = f"{role}-{self._next_index}"
        self._next_index += 1
        return iid

    async def _launch(self, role: Role) -> None:
        s = self.settings
        log_dir = Path(s.local_worker_log_dir) if s.local_worker_log_dir else None
        iid = self._new_id(role)
        worker = await asyncio.to_thread(
            self.fleet.start_worker, role, s.model, backend=s.local_worker_backend,
            chunk_size=s.local_worker_chunk_size, batching=s.local_worker_batching,
            kv_tokens=s.local_worker_kv_tokens, log_dir=log_dir,
        )  # fmt: skip
        member = Member(worker, iid, role)
        self.members.append(member)
        log.info("starting %s worker %s on %s (log: %s)", role, member.id, worker.url, worker.log_path)
        self._start_bring_up(member)

    def _start_bring_up(self, member: Member) -> None:
        member.bring_up = self._spawn(self._bring_up(member))

    async def _bring_up(self, member: Member) -> None:
        """Wait for the worker's /health, then report it. A worker that exits or never answers is
        stopped and forgotten, and the pool asks for one fewer (no restart loop: a PUT tries again)."""
        deadline = time.monotonic() + self.settings.local_worker_start_timeout_s
        while True:
            if member.worker.proc.poll() is not None:
                tail = member.worker.log_path.read_text(errors="replace")[-1500:]
                log.error("%s worker %s exited before it was ready:\n%s", member.role, member.id, tail)
                await self._give_up(member)
                return
            health = await self._health(member)
            if health is not None:
                break
            if time.monotonic() > deadline:
                log.error("%s worker %s not healthy after %.0f s: stopped", member.role, member.id,
                          self.settings.local_worker_start_timeout_s)  # fmt: skip
                await self._give_up(member)
                return
            await asyncio.sleep(_POLL_S)
        member.healthy, member.ready_at = True, time.monotonic()
        member.role = _role_of(health) or member.role
        assert self._on_ready is not None
        ready = ReadyInstance(url=member.url, role=member.role, backend=self.settings.local_worker_backend,
                              model=self.settings.public_model_name, id=member.id)  # fmt: skip
        try:
            await self._on_ready(ready)
        except Exception:  # refused (e.g. a conflict): a worker nobody routes to is only a cost
            log.exception("registering %s worker %s failed: stopping it", member.role, member.id)
            await self._give_up(member)
            return
        if member.state == "starting":
            member.state = "ready"
        log.info("%s worker %s ready on %s (%.1f s)", member.role, member.id, member.url,
                 member.ready_at - member.worker.started_at)  # fmt: skip

    async def _retire(self, member: Member) -> None:
        """Drain and deregister (on_leaving) before the process stops: in that order, always."""
        task = member.bring_up
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if member.healthy and self._on_leaving is not None:
            try:
                await self._on_leaving(member.url)
            except Exception:  # it stays registered: stopping it now would fail what runs there
                log.exception("draining %s worker %s failed: left running", member.role, member.id)
                member.state = "ready"
                return
        await self._forget(member)
        log.info("%s worker %s drained and stopped", member.role, member.id)

    async def _give_up(self, member: Member) -> None:
        if member.state != "leaving":
            self._desired[member.role] = max(0, self._desired.get(member.role, 1) - 1)
        await self._forget(member)

    async def _forget(self, member: Member) -> None:
        await asyncio.to_thread(self.fleet.stop_worker, member.worker)
        with contextlib.suppress(ValueError):
            self.members.remove(member)
        self.stopped.append(member)

    async def _pick_leavers(self, active: list[Member], count: int) -> list[Member]:
        """Not ready yet first (nothing runs there), then the least loaded, the newest of equals."""
        loads = await asyncio.gather(*(self._load(m) for m in active))

        def key(pair: tuple[Member, int]) -> tuple[int, int, float]:
            member, load = pair
            return (0 if member.state == "starting" else 1, load, -member.worker.started_at)

        return [m for m, _ in sorted(zip(active, loads, strict=True), key=key)[:count]]

    async def _refresh(self) -> None:
        """Follow flips (a worker's pool is its current role) and drop workers whose process died
        (deregistered through on_leaving, which forgets an instance that is not answering at once)."""
        ready = [m for m in self.members if m.state == "ready"]
        healths = await asyncio.gather(*(self._health(m) for m in ready))
        for member, health in zip(ready, healths, strict=True):
            role = _role_of(health)
            if member.state != "ready":  # retired meanwhile
                continue
            if role is not None:
                if role != member.role:  # flipped: it moved pools, and so does what they ask for
                    self._desired[member.role] = max(0, self._desired.get(member.role, 1) - 1)
                    self._desired[role] = self._desired.get(role, 0) + 1
                member.role = role
            elif member.worker.proc.poll() is not None:
                log.warning("%s worker %s exited (code %s)", member.role, member.id, member.worker.proc.returncode)
                member.state = "leaving"
                self._spawn(self._retire(member))

    async def _watch(self) -> None:
        """Reconcile every _WATCH_S: follow flips, and start a replacement for a worker that died
        after it was ready (the pool still asks for it)."""
        while True:
            await asyncio.sleep(_WATCH_S)
            try:
                async with self._lock:
                    await self._refresh()
                    for role in POOL_ROLES:
                        for _ in range(self._desired.get(role, 0) - len(self._active(role))):
                            log.warning("the %s pool has fewer workers than asked for: starting one", role)
                            await self._launch(role)
            except Exception:  # never let one failed round stop the watch
                log.exception("local pool reconciliation failed")

    async def _health(self, member: Member) -> dict[str, object] | None:
        assert self._http is not None
        try:
            resp = await self._http.get(f"{member.url}/health")
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    async def _load(self, member: Member) -> int:
        """Requests running or queued on the worker (a worker that does not answer: none)."""
        if member.state != "ready" or self._http is None:
            return 0
        try:
            report = (await self._http.get(f"{member.url}/load")).json()
            return int(report.get("running", 0)) + int(report.get("queued", 0))
        except (httpx.HTTPError, ValueError):
            return 0

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _role_of(health: dict[str, object] | None) -> Role | None:
    role = health.get("role") if health else None
    return role if role in POOL_ROLES else None  # type: ignore[return-value]
