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


async def test_the_httpx_clients_get_their_pool_limits_and_share_one_tls_context():
    """An httpx client given a transport ignores its own `limits`: the transports carry them (the
    request and control pools stay within backend_max_connections), and every transport reuses the
    process's TLS context instead of reading the CA bundle again on the event loop."""
    from backends.http import tls_context
    from backends.worker import WorkerBackend

    pool = PoolLimits(max_connections=64)
    backends = [WorkerBackend("http://127.0.0.1:9", f"d{i}", "decode", pool=pool) for i in range(2)]
    try:
        for backend in backends:
            data_pool = backend._client._transport._pool  # type: ignore[attr-defined]
            control_pool = backend._control._transport._pool  # type: ignore[attr-defined]
            assert data_pool._max_connections == pool.streams
            assert control_pool._max_connections == pool.calls
            assert data_pool._ssl_context is tls_context() and control_pool._ssl_context is tls_context()
    finally:
        for backend in backends:
            await backend.close()
