"""An instance the monitor marked unhealthy returns to service by itself once it answers again,
and a full connection pool is "busy" (503 with Retry-After), never a health verdict."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import BackendBusy, BackendError, LoadReport
from backends.http import HTTPBackend, PoolLimits
from orchestrator.monitor import ClusterMonitor
from tests.conftest import fake_cluster


class Flaky:
    role = "decode"

    def __init__(self) -> None:
        self.down = True

    async def load(self) -> LoadReport:
        if self.down:
            raise BackendError("connection refused", status=503, retryable=True)
        return LoadReport(role="decode", free_kv_tokens=100, total_kv_tokens=100)


def test_an_unhealthy_instance_comes_back_when_it_answers_again():
    backend = Flaky()
    cluster = fake_cluster([("d", "decode", backend)])
    monitor = ClusterMonitor(cluster, interval_ms=100, failures_unhealthy=3)
    changes: list[tuple[str, str]] = []
    monitor.on_state_change.append(lambda inst, old, new: changes.append((old, new)))
    inst = cluster.instances["d"]

    async def run() -> None:
        for _ in range(3):
            await monitor.poll_all()
        assert inst.state == "unhealthy"
        await monitor.poll_all()
        assert inst.state == "unhealthy"  # still down: stays out of service
        backend.down = False
        await monitor.poll_all()

    asyncio.run(run())
    assert inst.state == "healthy" and changes == [("healthy", "unhealthy"), ("unhealthy", "healthy")]


async def test_a_full_pool_is_busy_not_a_failure():
    from backends.worker import WorkerBackend

    backend: HTTPBackend = WorkerBackend("http://127.0.0.1:9", "d", "decode",
                                         pool=PoolLimits(max_connections=2, acquire_timeout_s=0.1))
    try:
        async with backend.slot(), backend.slot():
            assert backend.busy_slots == 2
            with pytest.raises(BackendBusy) as info:
                async with backend.slot():
                    pass
        assert info.value.status == 503 and info.value.retryable
        assert backend.busy_slots == 0  # every slot came back
    finally:
        await backend.close()


def test_the_pool_bounds_every_connection_to_an_instance():
    """backend_max_connections is the whole budget: streams plus the control share (polls, calls)."""
    for total in (16, 17, 32, 64, 256, 1000):
        pool = PoolLimits(max_connections=total)
        assert pool.streams + pool.polls + pool.calls == total and pool.calls >= 1 and pool.polls >= 1
    assert PoolLimits(max_connections=256).streams == 248
    for total in (1, 2, 8, 15):  # under 16: control on top
        tiny = PoolLimits(max_connections=total)
        assert tiny.streams == total and (tiny.polls, tiny.calls) == (1, 1)
