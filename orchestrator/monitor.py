"""Cluster monitor: polls every instance's load on a fixed interval (APScheduler), marks instances
unhealthy after repeated failures and back healthy when they answer again."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from backends.base import KVEvents, LoadReport
from orchestrator.cluster import Cluster, Instance

log = logging.getLogger("tetri.monitor")
# Generous: a loaded engine answers /load slowly, and slowness is not ill health.
_POLL_TIMEOUT_S = 10.0

Listener = Callable[[], Awaitable[None]]


class ClusterMonitor:
    def __init__(self, cluster: Cluster, interval_ms: int = 100, failures_unhealthy: int = 3) -> None:
        self.cluster = cluster
        self.interval_s = interval_ms / 1000
        self.failures_unhealthy = failures_unhealthy
        self.listeners: list[Listener] = []
        self.on_state_change: list[Callable[[Instance, str, str], None]] = []
        # Engines that report their prefix-cache block events: placement's index follows them.
        self.on_kv_events: list[Callable[[Instance, KVEvents], None]] = []
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
        # poll() catches an instance's own errors; return_exceptions keeps any other one local too.
        for inst, result in zip(instances, await asyncio.gather(*(self.poll(i) for i in instances),
                                                                 return_exceptions=True), strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("polling instance %s failed: %r", inst.id, result)
        self.polls += 1
        for listener in self.listeners:
            try:
                await listener()
            except Exception:  # one listener's failure must not stop the others or the next tick
                log.exception("monitor listener %r failed", listener)

    async def poll(self, inst: Instance) -> None:
        try:
            # Bounded: one instance that hangs must not hold up every other instance's tick.
            load = check_load(await asyncio.wait_for(inst.backend.load(), _POLL_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - anything an engine answers (garbage included) is its fault
            inst.failures += 1
            if inst.failures >= self.failures_unhealthy and inst.state in ("healthy", "starting"):
                self._set_state(inst, "unhealthy", f"{inst.failures} failed polls: {exc!r}")
            return
        self.seen(inst, load)
        if inst.state in ("unhealthy", "starting"):
            self._set_state(inst, "healthy", "answers load polls")
        if inst.state == "healthy" and load.role != inst.backend.role:
            inst.backend.role = load.role  # flipped behind our back (e.g. by another replica)

    def seen(self, inst: Instance, load: LoadReport) -> None:
        """Keep a load report: every poll's, whoever asked (an adapter hands out each block event
        once, so a report read for another reason must still reach placement's prefix index)."""
        self.cluster.mark_seen(inst, load)
        if load.kv_events is not None:
            for on_events in self.on_kv_events:
                on_events(inst, load.kv_events)

    def _set_state(self, inst: Instance, state: str, why: str) -> None:
        old = inst.state
        inst.state = state  # type: ignore[assignment]
        log.warning("instance %s: %s -> %s (%s)", inst.id, old, state, why)
        for callback in self.on_state_change:
            callback(inst, old, state)

    async def check_health(self, inst: Instance, timeout_s: float) -> str | None:
        """Poll an instance not yet in the cluster until it answers a well-formed load report, at
        most `timeout_s` in all (each poll bounded by what is left). None when it did (the instance
        is then healthy, with its load), else why not. Fires no state-change callbacks: nothing is
        recorded for an instance that is refused."""
        deadline = time.monotonic() + timeout_s
        why = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return why
            try:
                load = check_load(await asyncio.wait_for(inst.backend.load(), left))
            except TimeoutError:
                return f"no load report in {timeout_s:g}s"
            except Exception as exc:  # noqa: BLE001 - any failure of the engine's answer
                why = str(exc) or repr(exc)
            else:
                self.seen(inst, load)
                inst.state = "healthy"
                if load.role != inst.backend.role:  # the engine says what it is, as poll() trusts it
                    inst.backend.role = load.role
                return None
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    async def wait_healthy(self, inst: Instance, timeout_s: float = 60.0) -> bool:
        return await self.check_health(inst, timeout_s) is None


_LOAD_NUMBERS = ("running", "queued", "free_kv_tokens", "total_kv_tokens", "queued_prompt_tokens",
                 "running_prompt_tokens", "heavy_decodes", "light_decodes", "leased_kv_tokens", "active_leases",
                 "chunk_size")  # fmt: skip


def check_load(load: object) -> LoadReport:
    """The load report, if it has the right shape: an engine answering garbage is unhealthy, and its
    numbers never reach placement or the flip policy."""
    if not isinstance(load, LoadReport):
        raise ValueError(f"load report of the wrong type {type(load).__name__}")
    if load.role not in ("prefill", "decode", "colocated"):
        raise ValueError(f"load report with an unknown role {load.role!r}")
    for name in _LOAD_NUMBERS:
        value = getattr(load, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"load report field {name} is not a number: {value!r}")
    if not isinstance(load.decode_remaining, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in load.decode_remaining
    ):
        raise ValueError("load report field decode_remaining is not a list of numbers")
    if not isinstance(load.accepting, bool) or not isinstance(load.extra, dict):
        raise ValueError("load report fields accepting/extra have the wrong type")
    return load
