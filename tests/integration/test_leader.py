"""Leader election through the store, replica heartbeats and recovery of dead replicas, on SQLite and
PostgreSQL (the ``db_url`` fixture of tests/integration/test_store.py: a temp file, or a throwaway schema)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from orchestrator.leader import Leader, ReplicaIdInUse, shareable_options
from orchestrator.store import Store
from tests.integration.test_store import db_url  # noqa: F401 - the fixture, parametrized over both databases


@pytest.fixture
def stores(db_url):  # noqa: F811
    """A factory of stores on one migrated database: one per replica, as separate processes have."""
    made: list[Store] = []

    def make() -> Store:
        s = Store(db_url)
        if not made:
            s.upgrade()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_one_holder_until_the_lease_expires_then_another_takes_it_with_a_new_term(stores):
    a, b = stores(), stores()
    first = a.claim_lease("leader", "ra", "ta", 0.6)
    assert first.held and first.holder == "ra" and first.term == 1
    assert 0.5 < first.expires_at - first.now <= 0.6
    lost = b.claim_lease("leader", "rb", "tb", 0.6)
    assert not lost.held and lost.holder == "ra" and lost.term == 1
    assert a.claim_lease("leader", "ra", "ta", 0.6).held  # a renewal keeps the term
    time.sleep(0.8)  # a stopped renewing
    taken = b.claim_lease("leader", "rb", "tb", 0.6)
    assert taken.held and taken.holder == "rb" and taken.term == 2
    assert not a.claim_lease("leader", "ra", "ta", 0.6).held  # the old holder cannot renew it back
    assert a.get_lease("leader")["token"] == "tb"


def test_a_released_lease_is_taken_at_once(stores):
    a, b = stores(), stores()
    assert a.claim_lease("leader", "ra", "ta", 30).held
    assert not b.release_lease("leader", "tb")  # not its lease
    assert a.release_lease("leader", "ta")
    assert b.claim_lease("leader", "rb", "tb", 30).held


def test_racing_claims_elect_exactly_one(stores):
    replicas = [stores() for _ in range(6)]
    replicas[0].claim_lease("warmup", "x", "x", 1)  # the lease table exists and the pools are warm
    barrier = threading.Barrier(len(replicas))
    held: list[str] = []
    errors: list[BaseException] = []

    def claim(i: int) -> None:
        barrier.wait()
        try:
            if replicas[i].claim_lease("leader", f"r{i}", f"t{i}", 5).held:
                held.append(f"r{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(held) == 1 and replicas[0].get_lease("leader")["holder"] == held[0]


def test_a_replica_id_held_by_a_live_process_is_refused(stores):
    a, b = stores(), stores()
    assert a.join_replicas("r1", "t-first", "host-a", 0.5)
    assert not b.join_replicas("r1", "t-second", "host-b", 0.5)  # live: refused
    assert a.join_replicas("r1", "t-first", "host-a", 0.5)  # the same process joins again
    time.sleep(0.7)  # the first stopped heartbeating: a restart may take the id
    assert b.join_replicas("r1", "t-second", "host-b", 0.5)
    assert not a.heartbeat("r1", "t-first")  # the old process lost its row


def test_leader_refuses_to_start_with_the_id_of_a_live_replica(stores):
    a = stores()
    assert a.join_replicas("r1", "someone-else", None, 60)
    stop = threading.Event()

    def beat() -> None:  # the other process lives on
        while not stop.wait(0.1):
            a.heartbeat("r1", "someone-else")

    beating = threading.Thread(target=beat)
    beating.start()
    leader = Leader(stores(), "r1", lease_s=0.6, renew_s=0.2, replica_timeout_s=0.4)
    try:
        with pytest.raises(ReplicaIdInUse):
            asyncio.run(leader.join())
    finally:
        stop.set()
        beating.join()
    asyncio.run(leader.join())  # once it is silent, the id is free after replica_timeout_s


def test_the_leader_fails_only_the_requests_and_instances_of_replicas_whose_heartbeat_expired(stores):
    dead, live = stores(), stores()
    dead.replica, live.replica = "r-dead", "r-live"
    assert dead.join_replicas("r-dead", "td", None, 1.0) and live.join_replicas("r-live", "tl", None, 1.0)
    dead.save_request("d-running", state="decoding", arrival=1.0)
    dead.save_request("d-done", state="finished", arrival=1.0)
    dead.save_instance("shared-by-dead", state="healthy", url="http://a:1")
    live.save_request("l-running", state="prefilling", arrival=1.0)
    live.save_instance("shared-by-live", state="healthy", url="http://b:1")
    assert dead.flush() and live.flush()
    assert live.recover_dead_replicas(1.0, "gone") == []  # both heartbeats are fresh
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # r-live keeps beating; r-dead went silent
        assert live.heartbeat("r-live", "tl")
        time.sleep(0.1)
    done = live.recover_dead_replicas(1.0, "gone")
    assert done == [{"replica": "r-dead", "requests_failed": 1, "instances_unknown": 1}]
    failed = live.get_request("d-running")
    assert failed["state"] == "failed" and failed["error"] == "gone" and failed["finish_reason"] == "error"
    assert live.get_request("d-done")["state"] == "finished"
    assert live.get_request("l-running")["state"] == "prefilling"  # a live peer's request is untouched
    assert live.get_instance("shared-by-dead")["state"] == "unknown"
    assert live.get_instance("shared-by-live")["state"] == "healthy"
    assert [r["id"] for r in live.live_replicas(1.0)] == ["r-live"]
    assert live.recover_dead_replicas(1.0, "gone") == []  # once
    assert not dead.heartbeat("r-dead", "td")  # it was declared dead: it must join again


async def _until(cond, timeout_s: float) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_a_follower_takes_over_within_lease_plus_renewal_when_the_leader_stops_renewing(stores):
    async def run() -> tuple[float, list[tuple[str, bool]]]:
        changes: list[tuple[str, bool]] = []
        a = Leader(stores(), "ra", lease_s=1.5, renew_s=0.5, replica_timeout_s=3.0)
        b = Leader(stores(), "rb", lease_s=1.5, renew_s=0.5, replica_timeout_s=3.0)
        for ld in (a, b):
            ld.on_change.append(lambda held, ld=ld: changes.append((ld.replica_id, held)))
            await ld.join()
        await a.tick()
        a.start()
        b.start()
        await asyncio.sleep(1.2)  # several renewals: a keeps it
        assert a.is_leader and not b.is_leader and a.term == 1
        assert a._task is not None
        a._task.cancel()  # a dies: no renewal, no release
        killed = time.monotonic()
        await _until(lambda: b.is_leader, 5.0)
        takeover = time.monotonic() - killed
        assert b.term == 2
        assert not a.is_leader  # its own clock told it: the lease it held has run out
        await b.stop()
        return takeover, changes

    takeover, changes = asyncio.run(run())
    assert takeover <= 1.5 + 0.5 + 0.5  # lease + one renewal period (+ slack for a loaded machine)
    assert changes == [("ra", True), ("rb", True), ("rb", False)]  # b stepped down when it stopped


def test_a_clean_stop_hands_the_lease_over_at_once(stores):
    async def run() -> float:
        a = Leader(stores(), "ra", lease_s=3.0, renew_s=0.5)
        b = Leader(stores(), "rb", lease_s=3.0, renew_s=0.5)
        for ld in (a, b):
            await ld.join()
        await a.tick()
        a.start()
        b.start()
        await asyncio.sleep(0.3)
        assert a.is_leader
        stopped = time.monotonic()
        await a.stop()
        await _until(lambda: b.is_leader, 5.0)
        took = time.monotonic() - stopped
        assert [r["id"] for r in b.store.live_replicas(3.0)] == ["rb"]  # a left the replicas table
        await b.stop()
        return took

    assert asyncio.run(run()) < 1.0  # the next renewal, not the lease's expiry


def test_a_leader_that_loses_the_database_steps_down_before_the_lease_can_pass(stores):
    async def run() -> None:
        store = stores()
        a = Leader(store, "ra", lease_s=1.0, renew_s=0.3)
        await a.join()
        await a.tick()
        assert a.is_leader
        store.claim_lease = lambda *a, **k: (_ for _ in ()).throw(OSError("database away"))  # type: ignore[method-assign]
        a.start()
        await _until(lambda: not a.is_leader, 1.2)  # within lease_s of its last successful claim
        expired = store.get_lease("leader")["expires_at"]
        assert expired > time.time() - 0.5  # ... and that lease has not even run out for the others yet
        await a.stop()

    asyncio.run(run())


def test_instance_options_reach_the_store_without_credentials(stores):
    s = stores()
    opts = {"bootstrap_port": 8998, "bootstrap_host": "10.0.0.7", "api_key": "sk-1", "auth_token": "t"}
    s.save_instance("p0", state="healthy", url="http://p0:1", options=shareable_options(opts))
    assert s.flush()
    assert s.get_instance("p0")["options"] == {"bootstrap_port": 8998, "bootstrap_host": "10.0.0.7"}
