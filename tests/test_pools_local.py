"""The local pool provider with real worker processes: a decode pool scaled 1 -> 3 -> 1 through
`PUT /admin/pools/decode` under a steady load. Nothing is lost (every request finishes, none fails,
request migration off so that a worker stopped too early would show), the new workers take traffic,
and each removed worker was drained and deregistered before its process stopped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator.config import InstanceSpec
from orchestrator.launcher import Fleet, process_fleet
from tests.conftest import ADMIN_TOKEN, TINY, make_settings, serve_app

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WORKER = {"chunk_size": "16", "kv_tokens": 4096}


@pytest.fixture
def up_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """What `tetri up` does first: one prefill and one decode worker in the process fleet, which
    the local provider then adopts."""
    fleet = process_fleet()
    try:
        fleet.start_worker("prefill", TINY, log_dir=tmp_path / "logs", **WORKER)  # type: ignore[arg-type]
        fleet.start_worker("decode", TINY, log_dir=tmp_path / "logs", **WORKER)  # type: ignore[arg-type]
        fleet.wait_healthy(timeout_s=300)
        yield fleet
    finally:
        fleet.stop()


def test_decode_pool_scales_1_3_1_under_load_and_loses_nothing(up_fleet: Fleet, tmp_path: Path) -> None:
    from bench.scale import measure
    from orchestrator.app import create_app

    specs = [InstanceSpec(url=w.url, backend="native", role=w.role, model=TINY, id=f"{w.role}-{i}")
             for i, w in enumerate(up_fleet.workers)]  # fmt: skip
    settings = make_settings(
        tmp_path, specs, pool_provider="local", local_worker_chunk_size=WORKER["chunk_size"],
        local_worker_kv_tokens=WORKER["kv_tokens"], local_worker_log_dir=str(tmp_path / "logs"),
        migrate_on_failure=False,
    )  # fmt: skip
    app = create_app(settings)
    state = app.state.tetri
    with serve_app(app) as url:
        pools = httpx.get(f"{url}/admin/pools", headers=AUTH).json()
        assert pools["provider"] == "local"
        by_role = {p["role"]: p for p in pools["pools"]}
        assert by_role["decode"]["ready"] == 1 and by_role["prefill"]["ready"] == 1  # `up`'s workers, adopted
        # Beyond local_max_workers: refused, nothing started.
        too_many = httpx.put(f"{url}/admin/pools/decode", json={"replicas": 9}, headers=AUTH)
        assert too_many.status_code == 409, too_many.text
        # A burst of long prompts just before the scale-down: requests routed to a leaving decode
        # instance are still prefilling elsewhere when it starts to drain; their KV must still be
        # taken there (the drain waits for them), or they would fail (migration is off).
        result = measure(url, ADMIN_TOKEN, TINY, role="decode", low=1, peak=3, clients=4, max_tokens=8,
                         prompt_words=30, settle_s=1.5, burst_at_down=6, burst_words=300)  # fmt: skip
        provider = state.pool_provider
        stopped = {m.id: m.worker.stopped_at for m in provider.stopped}
        deregistered = {e["instance_id"]: e["at"] for e in state.store.list_events(kind="deregister", limit=100)}
        state.store.flush()
        records = state.store.list_requests(limit=100_000)
    print(json.dumps(result, indent=1))
    assert result["requests"]["sent"] > 20
    assert result["requests"]["failed"] == 0, result["requests"]
    assert result["requests"]["not_finished"] == 0
    assert all(r["state"] == "finished" for r in records), {r["state"] for r in records}
    added = [n["id"] for n in result["scale_up"]["instances"]]
    assert len(added) == 2 and all(n["requests"] > 0 for n in result["scale_up"]["instances"]), result["scale_up"]
    removed = [r["id"] for r in result["scale_down"]["removed"]]
    assert len(removed) == 2 and result["scale_down"]["failed"] == 0, result["scale_down"]
    for iid in removed:
        # Drained and deregistered first, the process stopped after; nothing it ran ended later.
        assert iid in stopped and iid in deregistered, (iid, stopped, deregistered)
        assert deregistered[iid] <= stopped[iid]
        ran_there = [r for r in records if r["decode_instance"] == iid]
        assert all(r["finished_at"] <= stopped[iid] for r in ran_there)
    assert len(process_fleet().workers) == 2  # back to the prefill worker and one decode worker
