"""The SQL store on SQLite (a temp file) and PostgreSQL (a throwaway schema at 127.0.0.1:5432).

Every test runs on both databases; the PostgreSQL cases skip, saying why, only when the server is
unreachable.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from orchestrator.store import REQUEST_STATES, Base, Store, db_upgrade_command, head_revision

# The newest migration: a new revision changes this one line.
HEAD = "0004_leases"
PG_URL = os.environ.get("TETRI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_unreachable() -> str | None:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover
        return f"psycopg not installed: {exc}"
    dsn = sa.make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL unreachable at {PG_URL}: {exc}"


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request, tmp_path):
    """A fresh, empty database URL; PostgreSQL gets its own schema, dropped afterwards."""
    if request.param == "sqlite":
        # A parent directory that does not exist yet: the store must create it.
        yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'tetri.db'}"
        return
    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"tetri_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    s.upgrade()
    s.start()
    yield s
    s.close()


def _write_lock(db_url: str):
    """Hold the database's write lock on another connection: returns (engine, connection)."""
    eng = sa.create_engine(db_url, connect_args={"check_same_thread": False} if "sqlite" in db_url else {})
    conn = eng.connect()
    if eng.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        conn.begin()
        conn.exec_driver_sql("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
    return eng, conn


# --------------------------------------------------------------------------- schema


def test_migration_creates_tables_matching_models(db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Alembic must not depend on the working directory
    s = Store(db_url)
    try:
        assert s.current_revision() is None
        s.upgrade()
        s.upgrade()  # idempotent
        assert s.current_revision() == head_revision() == HEAD
        insp = sa.inspect(s.engine)
        assert {"instances", "requests", "events", "alembic_version"} <= set(insp.get_table_names())
        req_cols = {c["name"] for c in insp.get_columns("requests")}
        for col in (
            "id model backend state prefill_instance decode_instance prompt_tokens completion_tokens "
            "predicted_bucket predictor_granularity arrival prefill_started_at first_token_at "
            "decode_started_at finished_at finish_reason error kv_bytes kv_transfer_s cached_tokens"
        ).split():
            assert col in req_cols
        indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes("requests")}
        assert ("state",) in indexed and ("arrival",) in indexed
        ev_cols = {c["name"] for c in insp.get_columns("events")}
        assert {"id", "at", "kind", "instance_id", "request_id", "detail", "duration_s"} <= ev_cols

        # The hand-written migration and the SQLAlchemy models describe the same schema.
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        with s.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == []
    finally:
        s.close()


def test_db_upgrade_command(db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = db_upgrade_command(db_url)
    assert HEAD in msg
    s = Store(db_url)
    try:
        assert s.current_revision() == HEAD
    finally:
        s.close()


def test_db_upgrade_command_uses_environment(tmp_path, monkeypatch):
    path = tmp_path / "env" / "from-env.db"
    monkeypatch.setenv("TETRI_DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.chdir(tmp_path)
    assert HEAD in db_upgrade_command(None)
    assert path.exists()
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == HEAD


def test_sqlite_uses_wal(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    finally:
        s.close()


# --------------------------------------------------------------------------- write-behind


def test_upsert_flush_read_back(store):
    store.save_instance("p0", backend="native", role="prefill", state="up", url="http://127.0.0.1:9001")
    store.save_request("r1", model="m", state="queued", arrival=100.5, prompt_tokens=12)
    assert store.flush(5.0)
    inst = store.list_instances()
    assert [i["id"] for i in inst] == ["p0"]
    assert inst[0]["role"] == "prefill" and inst[0]["url"] == "http://127.0.0.1:9001"
    created = inst[0]["created_at"]
    assert created == pytest.approx(time.time(), abs=60)

    time.sleep(0.01)
    load = {"running": 3, "free_kv_tokens": 1000, "nested": {"a": [1, 2]}}
    store.save_instance("p0", state="draining", last_load=load, capacity_kv_tokens=4096, last_seen=123.0)
    load["running"] = 99  # mutating after the call must not change what is written
    store.save_request(
        "r1",
        state="finished",
        prefill_instance="p0",
        decode_instance="d0",
        completion_tokens=40,
        first_token_at=101.0,
        finished_at=102.25,
        finish_reason="stop",
        kv_bytes=1 << 33,
        kv_transfer_s=0.004,
    )
    assert store.flush(5.0)
    inst = store.list_instances()[0]
    assert inst["state"] == "draining" and inst["role"] == "prefill"  # untouched fields kept
    assert inst["last_load"] == {"running": 3, "free_kv_tokens": 1000, "nested": {"a": [1, 2]}}
    assert inst["capacity_kv_tokens"] == 4096 and inst["last_seen"] == 123.0
    assert inst["created_at"] == created and inst["updated_at"] > created

    r = store.get_request("r1")
    assert r["state"] == "finished" and r["arrival"] == 100.5 and r["prompt_tokens"] == 12
    assert (r["prefill_instance"], r["decode_instance"]) == ("p0", "d0")
    assert r["completion_tokens"] == 40 and r["finished_at"] == 102.25 and r["finish_reason"] == "stop"
    assert r["kv_bytes"] == 1 << 33 and r["kv_transfer_s"] == pytest.approx(0.004)
    assert store.get_request("nope") is None


def test_saves_are_rejected_for_unknown_columns(store):
    with pytest.raises(ValueError):
        store.save_request("r1", not_a_column=1)
    with pytest.raises(ValueError):
        store.save_instance("i1", created_at=1.0)


def test_saves_never_block_and_writer_retries(db_url):
    s = Store(db_url, busy_timeout_ms=50, retry_max_backoff_s=0.1)
    s.upgrade()
    s.start()
    eng, conn = _write_lock(db_url)
    try:
        t0 = time.perf_counter()
        for i in range(200):
            s.save_request(f"r{i}", state="queued", arrival=float(i))
            s.add_event("scale", detail={"i": i})
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, f"enqueueing 400 writes took {elapsed:.3f}s while the DB was locked"
        assert not s.flush(0.5), "flush reported success while the database was locked"
    finally:
        conn.rollback()
        conn.close()
        eng.dispose()
    try:
        assert s.flush(10.0)
        assert s.request_stats()["queued"] == 200
        assert len(s.list_events(kind="scale", limit=1000)) == 200
        if s.dialect == "sqlite":  # SQLite reports "database is locked": the batch was retried
            assert s.stats()["retries"] >= 1
    finally:
        s.close()


def test_concurrent_writers_lose_nothing(store):
    threads_n, updates = 8, 200
    ids_per_thread = 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(updates):
                rid = f"t{t}-r{i % ids_per_thread}"
                state = "finished" if i >= updates - ids_per_thread else "decoding"
                store.save_request(rid, state=state, completion_tokens=i, decode_instance=f"d{t}")
                store.save_instance(f"inst{t}", state="up", last_load={"i": i})
                store.add_event("flip", instance_id=f"inst{t}", detail={"i": i}, duration_s=i / 1000)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert store.flush(20.0)

    for t in range(threads_n):
        for k in range(ids_per_thread):
            r = store.get_request(f"t{t}-r{k}")
            last_i = max(i for i in range(updates) if i % ids_per_thread == k)
            assert r is not None
            assert (r["completion_tokens"], r["state"], r["decode_instance"]) == (last_i, "finished", f"d{t}")
    insts = {i["id"]: i for i in store.list_instances()}
    assert set(insts) == {f"inst{t}" for t in range(threads_n)}
    assert all(i["last_load"] == {"i": updates - 1} for i in insts.values())
    events = store.list_events(kind="flip", limit=10_000)
    assert len(events) == threads_n * updates
    # Every (thread, i) pair exactly once, and per instance in the order it was added.
    seen = sorted((e["instance_id"], e["detail"]["i"]) for e in events)
    assert seen == sorted((f"inst{t}", i) for t in range(threads_n) for i in range(updates))
    for t in range(threads_n):
        mine = [e["detail"]["i"] for e in store.list_events(instance_id=f"inst{t}", limit=10_000)]
        assert mine == list(reversed(range(updates)))  # newest first
    assert store.request_stats()["finished"] == threads_n * ids_per_thread


def test_coalescing_keeps_latest_values(db_url):
    s = Store(db_url, autostart=False)
    s.upgrade()
    try:
        s.save_request("r", state="queued", arrival=1.0, prompt_tokens=7, error="transient")
        for i in range(300):
            s.save_request("r", state="decoding", completion_tokens=i)
        s.save_request("r", decode_instance="d1", error=None)
        s.save_request("r", state="finished", finished_at=9.0)
        s.save_instance("i", role="prefill", url="u1")
        s.save_instance("i", role="decode")
        assert s.stats()["queued"] == 305 and s.stats()["commits"] == 0  # nothing written yet
        assert s.get_request("r") is None
        assert s.flush(5.0)
        st = s.stats()
        assert st["commits"] == 1 and st["written"] == 2  # 305 upserts became 2 rows in 1 commit
        r = s.get_request("r")
        assert r["state"] == "finished" and r["completion_tokens"] == 299
        assert r["arrival"] == 1.0 and r["prompt_tokens"] == 7 and r["finished_at"] == 9.0
        assert r["decode_instance"] == "d1" and r["error"] is None  # an explicit None wins too
        (inst,) = s.list_instances()
        assert (inst["role"], inst["url"]) == ("decode", "u1")
    finally:
        s.close()


def test_bad_row_is_dropped_and_the_rest_written(db_url):
    s = Store(db_url, autostart=False)
    s.upgrade()
    try:
        s.save_request("good1", state="queued")
        s.save_request("bad", state="queued", prompt_tokens=object())  # no database can store it
        s.add_event("register", instance_id="x")
        assert not s.flush(5.0)  # reports that something was lost
        assert s.stats()["dropped"] == 1
        assert s.get_request("good1") is not None and s.get_request("bad") is None
        assert len(s.list_events(kind="register")) == 1
        s.save_request("good2", state="queued")  # the writer keeps going
        assert s.flush(5.0)
        assert s.get_request("good2") is not None
    finally:
        s.close()


def test_events_with_durations(store):
    before = time.time()
    store.add_event("register", instance_id="p0", detail={"url": "http://x"})
    store.add_event("drain", instance_id="p0", duration_s=1.5)
    store.add_event("flip", instance_id="p0", detail={"from": "prefill", "to": "decode"}, duration_s=0.25)
    store.add_event("flip", instance_id="p1", request_id=None, duration_s=0.5, at=42.0)
    store.add_event("unhealthy", instance_id="p1", request_id="req-9")
    assert store.flush(5.0)

    flips = store.list_events(kind="flip")
    assert [(e["instance_id"], e["duration_s"]) for e in flips] == [("p1", 0.5), ("p0", 0.25)]
    assert flips[0]["at"] == 42.0
    assert flips[1]["detail"] == {"from": "prefill", "to": "decode"}
    assert before - 1 <= flips[1]["at"] <= time.time() + 1
    (drain,) = store.list_events(kind="drain")
    assert drain["duration_s"] == 1.5 and drain["detail"] is None
    assert [e["kind"] for e in store.list_events()] == ["unhealthy", "flip", "flip", "drain", "register"]
    assert len(store.list_events(limit=2)) == 2
    assert [e["kind"] for e in store.list_events(instance_id="p0")] == ["flip", "drain", "register"]
    assert store.list_events(request_id="req-9")[0]["kind"] == "unhealthy"


def test_predictor_accuracy_arithmetic(store):
    empty = store.predictor_accuracy(200)
    assert empty == {"granularity": 200, "n": 0, "accuracy": None, "within_one_bucket": None}

    rows = {
        # id: (state, predicted_bucket, completion_tokens, granularity)
        "exact0": ("finished", 0, 150, 200),  # true bucket 0: exact
        "exact1": ("finished", 1, 399, 200),  # true bucket 1: exact
        "far": ("finished", 2, 100, 200),  # true 0, predicted 2: neither
        "near": ("finished", 1, 400, 200),  # true 2, predicted 1: within one
        "nogran": ("finished", 3, 650, None),  # no granularity recorded: counted at any g; true 3 @200
        "running": ("decoding", 0, 10, 200),  # not finished: excluded
        "nopred": ("finished", None, 10, 200),  # no prediction: excluded
        "notrue": ("finished", 0, None, 200),  # no true length: excluded
        "g100": ("finished", 0, 50, 100),  # other granularity: excluded at 200
    }
    for rid, (state, pred, tokens, g) in rows.items():
        store.save_request(rid, state=state, predicted_bucket=pred, completion_tokens=tokens, predictor_granularity=g)
    assert store.flush(5.0)

    acc = store.predictor_accuracy(200)
    assert acc["n"] == 5
    assert acc["accuracy"] == pytest.approx(3 / 5)  # exact0, exact1, nogran
    assert acc["within_one_bucket"] == pytest.approx(4 / 5)  # + near

    capped = store.predictor_accuracy(200, num_buckets=2)  # true buckets capped at 1
    # exact0 ok, exact1 ok, far (2 vs 0) wrong, near (1 vs min(2,1)=1) ok, nogran (3 vs 1) wrong
    assert capped["n"] == 5
    assert capped["accuracy"] == pytest.approx(3 / 5)
    assert capped["within_one_bucket"] == pytest.approx(3 / 5)

    acc100 = store.predictor_accuracy(100)  # g100 (exact) and nogran (true 6 vs 3: wrong)
    assert (acc100["n"], acc100["accuracy"], acc100["within_one_bucket"]) == (2, 0.5, 0.5)
    with pytest.raises(ValueError):
        store.predictor_accuracy(0)


def test_request_stats(store):
    for i, state in enumerate(["queued", "queued", "decoding", "finished", "failed", "finished", "finished"]):
        store.save_request(f"r{i}", state=state, arrival=float(i))
    assert store.flush(5.0)
    stats = store.request_stats()
    assert set(REQUEST_STATES) <= set(stats)
    assert stats["queued"] == 2 and stats["decoding"] == 1 and stats["finished"] == 3
    assert stats["failed"] == 1 and stats["cancelled"] == 0 and stats["prefilling"] == 0
    assert [r["id"] for r in store.list_requests(state="finished")] == ["r6", "r5", "r3"]


def test_close_flushes(db_url):
    s = Store(db_url)
    s.upgrade()
    for i in range(500):
        s.save_request(f"r{i % 50}", state="finished", completion_tokens=i)
    s.add_event("deregister", instance_id="d0", duration_s=0.1)
    assert s.close()  # no flush() first: close must write everything
    assert s.closed
    assert s.flush() and s.close()  # idempotent after close
    s.save_request("late", state="failed")  # after close: written through, not lost
    s.add_event("scale", detail={"after": "close"})

    s2 = Store(db_url)
    try:
        assert s2.request_stats()["finished"] == 50
        assert s2.get_request("r49")["completion_tokens"] == 499
        assert s2.get_request("late")["state"] == "failed"
        assert s2.list_events(kind="deregister")[0]["duration_s"] == 0.1
        assert len(s2.list_events(kind="scale")) == 1
    finally:
        s2.close()


def test_writer_thread_stops_on_close(db_url):
    s = Store(db_url)
    s.upgrade()
    s.save_request("r", state="queued")
    thread = s._thread
    assert thread is not None and thread.is_alive()
    s.close()
    assert not thread.is_alive()


def test_in_memory_sqlite_is_shared_across_threads():
    s = Store("sqlite://")
    s.upgrade()
    try:
        s.save_request("r", state="queued")
        assert s.flush(5.0)
        out = []
        th = threading.Thread(target=lambda: out.append(s.get_request("r")))
        th.start()
        th.join()
        assert out[0]["state"] == "queued"
    finally:
        s.close()


def test_recent_traffic_is_finished_requests_since_a_time_oldest_first(store):
    store.save_request("old", state="finished", arrival=10.0, prompt_tokens=5, completion_tokens=7)
    store.save_request("b", state="finished", arrival=30.0, prompt_tokens=50, completion_tokens=70)
    store.save_request("a", state="finished", arrival=20.0, prompt_tokens=40, completion_tokens=60)
    store.save_request("failed", state="failed", arrival=25.0, prompt_tokens=40, completion_tokens=3)
    store.save_request("running", state="decoding", arrival=26.0, prompt_tokens=40)
    store.save_request("empty", state="finished", arrival=27.0, prompt_tokens=40, completion_tokens=0)
    assert store.flush(5.0)
    rows = store.recent_traffic(since=15.0)
    assert rows == [
        {"arrival": 20.0, "prompt_tokens": 40, "completion_tokens": 60},
        {"arrival": 30.0, "prompt_tokens": 50, "completion_tokens": 70},
    ]
    assert [r["arrival"] for r in store.recent_traffic(since=0.0, limit=2)] == [20.0, 30.0]  # the newest two


# --------------------------------------------------------------------------- crash recovery


def test_recover_fails_inflight_requests_of_this_replica_only(db_url):
    """After a SIGKILL the rows of requests in flight stay `decoding` etc. forever; a restart of the
    same replica fails them with a reason, leaves finished ones and another replica's alone."""
    s = Store(db_url, replica="r1")
    s.upgrade()
    for state in ("queued", "prefilling", "transferring", "decoding", "finished", "cancelled"):
        s.save_request(f"mine-{state}", state=state, arrival=1.0)
    s.save_request("mine-failed", state="failed", error="engine said no", finished_at=5.0)
    s.save_instance("p0", state="healthy", url="http://127.0.0.1:9001")
    s.save_instance("gone", state="removed")
    s.replica = "r2"  # another live replica sharing the database
    s.save_request("theirs-decoding", state="decoding", arrival=1.0)
    s.save_instance("d9", state="healthy")
    s.replica = None  # rows from before the replica column: a single-replica deployment's
    s.save_request("legacy-queued", state="queued")
    assert s.close()

    s = Store(db_url, replica="r1")  # the restart
    try:
        before = time.time()
        assert s.recover("r1", "orchestrator restarted while the request was in flight") == {
            "requests_failed": 5,
            "instances_unknown": 1,
        }
        for rid in ("mine-queued", "mine-prefilling", "mine-transferring", "mine-decoding", "legacy-queued"):
            row = s.get_request(rid)
            assert row["state"] == "failed", rid
            assert row["error"] == "orchestrator restarted while the request was in flight"
            assert row["finish_reason"] == "error" and row["finished_at"] >= before
        assert s.get_request("mine-finished")["state"] == "finished"
        assert s.get_request("mine-cancelled")["state"] == "cancelled"
        assert s.get_request("mine-failed")["error"] == "engine said no"
        assert s.get_request("theirs-decoding")["state"] == "decoding"
        stats = s.request_stats()
        assert stats["decoding"] == 1 and stats["queued"] == stats["prefilling"] == stats["transferring"] == 0
        p0 = s.get_instance("p0")
        assert p0["state"] == "unknown" and p0["updated_at"] >= before
        assert s.get_instance("gone")["state"] == "removed"
        assert s.get_instance("d9")["state"] == "healthy"
        assert s.recover("r1", "again") == {"requests_failed": 0, "instances_unknown": 0}  # idempotent
    finally:
        s.close()


def test_rows_carry_the_replica_that_wrote_them(store):
    store.replica = "replica-a"
    store.save_request("r", state="queued")
    store.save_instance("i", state="healthy")
    store.save_request("r", state="finished", replica="explicit")  # an explicit value wins
    assert store.flush(5.0)
    assert store.get_request("r")["replica"] == "explicit"
    assert store.get_instance("i")["replica"] == "replica-a"
