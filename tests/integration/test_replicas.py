"""Several orchestrator replicas on one store (issue 19), on SQLite and PostgreSQL.

Fast: two in-process replicas over fake workers: one leader, followers run no once-only loop, an
instance registered or deregistered through one replica is driven or dropped by the other within a
sync period, a clean stop hands the lease over at once, and only the last replica to stop leaves
the instance rows "unknown". Slow: two replica processes share real native workers; 200 requests
split across both, the leader SIGKILLed mid-run (bench/failover.py, `tetri bench failover`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.failover import measure
from orchestrator.app import create_app
from orchestrator.store import Store
from tests.conftest import TINY, make_settings, serve_app
from tests.integration.test_registration_and_recovery import AUTH, FakeEngine, engines, new_engine  # noqa: F401
from tests.integration.test_store import db_url  # noqa: F401 - the fixture, parametrized over both databases


def _wait(cond, timeout_s: float) -> float:  # noqa: ANN001
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        time.sleep(0.05)
    return time.monotonic() - started


def _ids(url: str) -> set[str]:
    return {i["id"] for i in httpx.get(f"{url}/admin/instances", headers=AUTH, timeout=10).json()["instances"]}


def _settings(tmp_path: Path, url: str, replica: str) -> Any:
    s = make_settings(tmp_path, [], replica_id=replica, instance_sync_s=0.3, leader_lease_s=1.0,
                      leader_renew_s=0.25, replica_timeout_s=2.0, monitor_interval_ms=50)  # fmt: skip
    return s.model_copy(update={"database_url": url})


def test_two_replicas_share_registrations_and_hand_the_lease_over(tmp_path, db_url, engines):  # noqa: F811
    Store(db_url).upgrade()  # as `tetri db upgrade` before a rollout: two lifespans never race to migrate
    app_a, app_b = create_app(_settings(tmp_path, db_url, "a")), create_app(_settings(tmp_path, db_url, "b"))
    a, b = app_a.state.tetri, app_b.state.tetri
    engine = new_engine(engines)
    with serve_app(app_a) as url_a:
        with serve_app(app_b) as url_b:
            assert a.leader.is_leader and not b.leader.is_leader  # a started first
            body = {"url": engine.url, "backend": "native", "role": "colocated", "model": TINY, "id": "colo-0"}
            assert httpx.post(f"{url_a}/admin/instances", json=body, headers=AUTH, timeout=30).status_code == 201
            took = _wait(lambda: "colo-0" in _ids(url_b), 5.0)  # b drives it without being told
            assert took < 0.3 + 2.0  # a sync period plus a write-behind commit and a health check
            assert b.cluster.get("colo-0").state == "healthy"
            chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            reply = httpx.post(f"{url_b}/v1/chat/completions", json=chat, timeout=30)
            assert reply.status_code == 200

            assert httpx.delete(f"{url_a}/admin/instances/colo-0", headers=AUTH, timeout=30).status_code == 200
            _wait(lambda: "colo-0" not in _ids(url_b), 5.0)  # deregistered through a: dropped by b

            assert httpx.post(f"{url_b}/admin/instances", json=body, headers=AUTH, timeout=30).status_code == 201
            _wait(lambda: "colo-0" in _ids(url_a), 5.0)  # and the other way round, under the same id
        # b stopped cleanly: a still drives the instance, so the row stays healthy (claimed back by a).
        assert a.leader.is_leader
        a.store.flush()
        _wait(lambda: (a.store.get_instance("colo-0") or {}).get("state") == "healthy", 3.0)
        assert [r["id"] for r in a.store.live_replicas(2.0)] == ["a"]
    check = Store(db_url)
    try:
        assert check.get_instance("colo-0")["state"] == "unknown"  # a was the last: nobody watches it now
        assert check.live_replicas(60) == []
        events = check.list_events("leader", limit=20)
        assert {(e["detail"]["replica"], e["detail"]["leader"]) for e in events} >= {("a", True), ("a", False)}
    finally:
        check.close()


def test_a_follower_leads_at_once_when_the_leader_stops_cleanly(tmp_path, db_url):  # noqa: F811
    Store(db_url).upgrade()
    app_a, app_b = create_app(_settings(tmp_path, db_url, "a")), create_app(_settings(tmp_path, db_url, "b"))
    b = app_b.state.tetri
    with serve_app(app_b):
        assert b.leader.is_leader  # alone: it leads
        with serve_app(app_a):
            assert not app_a.state.tetri.leader.is_leader  # a joined a led deployment: it follows
        assert b.leader.is_leader


def test_the_follower_runs_no_flip_policy(tmp_path, db_url, engines):  # noqa: F811
    """The flip policy decides on the leader only: a follower's monitor tick flips nothing."""
    Store(db_url).upgrade()
    s_a = _settings(tmp_path, db_url, "a").model_copy(update={"flip_policy": "idle"})
    s_b = _settings(tmp_path, db_url, "b").model_copy(update={"flip_policy": "idle"})
    app_a, app_b = create_app(s_a), create_app(s_b)
    decided: dict[str, int] = {"a": 0, "b": 0}
    for name, app in (("a", app_a), ("b", app_b)):
        policy = app.state.tetri.flip_policy

        def counting(views, now, policy=policy, name=name):  # noqa: ANN001
            decided[name] += 1
            return policy.__class__.decide(policy, views, now)

        policy.decide = counting  # type: ignore[method-assign]
    with serve_app(app_a), serve_app(app_b):
        time.sleep(0.5)  # ten monitor ticks each
    assert decided["a"] > 0 and decided["b"] == 0


@pytest.mark.slow
def test_two_replica_processes_share_native_workers_and_survive_the_leader_killed(tmp_path, db_url):  # noqa: F811
    """200 requests split across two `tetri serve` processes over one prefill and two decode workers
    with small KV pools; the leader SIGKILLed after 80: the follower holds the lease within 5 s,
    recovers the dead replica's requests, nothing is lost and no decode worker ever holds more KV
    than its pool (each refuses a push it cannot take with 507; the orchestrator places it again)."""
    r = measure(db_url, requests=200, concurrency=16, max_tokens=16, decode_kv_tokens=768, kill_at=0.4,
                lease_s=3.0, renew_s=1.0, replica_timeout_s=3.0, sync_s=1.0, log_dir=tmp_path / "logs")  # fmt: skip
    assert r.completed == 200 and r.lost == 0
    assert r.leader_before in ("a", "b") and r.leader_after not in ("", r.leader_before)
    assert r.failover_s is not None and r.failover_s <= 5.0
    assert r.loops_s is not None and r.loops_s <= 3.0 + 3.0 + 1.5  # heartbeat timeout + lease + renewal
    assert r.inflight_rows_left == 0  # the dead replica's in-flight rows were failed, nothing hangs
    assert r.per_replica["a"] > 0 and r.per_replica["b"] > 0
    assert r.sync_visible_s is not None and r.sync_visible_s <= 5.0
    for name, kv in r.kv.items():
        assert kv.reports > 50, name
        assert kv.over == 0 and kv.max_used <= kv.total and kv.max_leased <= kv.total, (name, kv)
