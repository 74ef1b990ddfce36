"""Cluster monitor: polls every instance's load on a fixed interval (APScheduler), marks instances
unhealthy after repeated failures and back healthy when they answer again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from backends.base import BackendError
from orchestrator.cluster import Cluster, Instance

log = logging.getLogger("tetri.monitor")

Listener = Callable[[], Awaitable[None]]


class ClusterMonitor:
    def __init__(self, cluster: Cluster, interval_ms: int = 100, failures_unhealthy: int = 3) -> None:
        self.cluster = cluster
        self.interval_s = interval_ms / 1000
        self.failures_unhealthy = failures_unhealthy
        self.listeners: list[Listener] = []
        self.on_state_change: list[Callable[[Instance, str, str], None]] = []
        self._scheduler: AsyncIOScheduler | None = None
        self.polls = 0

    def start(self) -> None:
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self.poll_all, "interval", seconds=self.interval_s, max_instances=1, coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start()

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)

    async def poll_all(self) -> None:
        instances = [i for i in self.cluster.instances.values() if i.state not in ("removed", "flipping")]
        await asyncio.gather(*(self.poll(i) for i in instances))
        self.polls += 1
        for listener in self.listeners:
            await listener()

    async def poll(self, inst: Instance) -> None:
        try:
            load = await inst.backend.load()
        except (BackendError, OSError) as exc:
            inst.failures += 1
            if inst.failures >= self.failures_unhealthy and inst.state in ("healthy", "starting"):
                self._set_state(inst, "unhealthy", f"{inst.failures} failed polls: {exc}")
            return
        self.cluster.mark_seen(inst, load)
        if inst.state in ("unhealthy", "starting"):
            self._set_state(inst, "healthy", "answers load polls")
        if inst.state == "healthy" and load.role != inst.backend.role:
            inst.backend.role = load.role  # flipped behind our back (e.g. by another replica)

    def _set_state(self, inst: Instance, state: str, why: str) -> None:
        old = inst.state
        inst.state = state  # type: ignore[assignment]
        log.warning("instance %s: %s -> %s (%s)", inst.id, old, state, why)
        for callback in self.on_state_change:
            callback(inst, old, state)

    async def wait_healthy(self, inst: Instance, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.poll(inst)
            if inst.state == "healthy":
                return True
            await asyncio.sleep(0.2)
        return False
