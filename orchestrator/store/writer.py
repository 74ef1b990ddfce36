"""The SQL store: write-behind writes, synchronous reads, Alembic migrations.

``save_instance``, ``save_request`` and ``add_event`` only put a tuple on a ``queue.SimpleQueue``;
they never touch the database and never block the caller. One background writer thread drains the
queue in batches, coalesces several upserts of the same id into one (later values win, field by
field), writes each batch in one transaction with dialect-native upserts (``INSERT … ON CONFLICT DO
UPDATE`` on SQLite and PostgreSQL) and retries transient errors (a locked SQLite file, a dropped
PostgreSQL connection) with backoff, keeping the batch. ``flush()`` waits until everything
enqueued before the call is committed. Reads run synchronously on the caller's thread.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import queue
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool

from orchestrator.store.models import (
    INSTANCE_COLUMNS,
    REQUEST_COLUMNS,
    EventRow,
    InstanceRow,
    RequestRow,
)
from orchestrator.store.urls import default_url, is_memory_sqlite, normalize_url, prepare_sqlite_path

log = logging.getLogger("tetri.store")

INSTANCES: Table = InstanceRow.__table__  # type: ignore[assignment]
REQUESTS: Table = RequestRow.__table__  # type: ignore[assignment]
EVENTS: Table = EventRow.__table__  # type: ignore[assignment]

# Columns a caller may set through save_instance (id is the key; created_at/updated_at are ours).
_INSTANCE_FIELDS = INSTANCE_COLUMNS - {"id", "created_at", "updated_at"}
_REQUEST_FIELDS = REQUEST_COLUMNS - {"id"}


# --------------------------------------------------------------------------- value handling


def _json_default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):  # numpy arrays
        return o.tolist()
    return str(o)


def _json_dumps(o: Any) -> str:
    return json.dumps(o, default=_json_default)


_PLAIN = (str, int, float, bool, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)  # `type(v) in`: a request's every save, without a call per field


def _clean(v: Any) -> Any:
    """Cheap, shallow normalisation at enqueue time: copy dicts (so that a caller mutating its
    load report afterwards does not change what we write) and unwrap numpy/pydantic values."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, dict):
        return dict(v)
    if hasattr(v, "model_dump"):
        return v.model_dump()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, (list, tuple)):
        return list(v)
    if hasattr(v, "item"):
        return v.item()
    return v


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying with the same batch: lock contention, lost connections, serialization."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    if isinstance(exc, InterfaceError) and "sqlite" not in type(orig).__module__:
        return True  # psycopg: the connection went away
    if isinstance(exc, OperationalError):
        orig = exc.orig if exc.orig is not None else exc
        if "sqlite" in type(orig).__module__:
            # SQLite reports "no such table" and syntax errors as OperationalError too.
            msg = str(orig).lower()
            return any(s in msg for s in ("locked", "busy", "disk i/o", "unable to open"))
        return True  # PostgreSQL: connection failures, deadlocks, serialization failures
    return False


# --------------------------------------------------------------------------- the writer


class _Flush:
    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = True


_STOP = object()


class _Pending:
    """What the writer holds but has not committed yet, already coalesced."""

    __slots__ = ("instances", "requests", "events")

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.instances) + len(self.requests) + len(self.events)

    def add(self, item: tuple) -> None:
        kind = item[0]
        if kind == "e":
            self.events.append(item[1])
            return
        target = self.instances if kind == "i" else self.requests
        cur = target.get(item[1])
        if cur is None:
            target[item[1]] = item[2]
        else:
            created = cur.get("created_at")
            cur.update(item[2])
            if created is not None:  # first sighting wins for created_at
                cur["created_at"] = created

    def clear(self) -> None:
        self.instances = {}
        self.requests = {}
        self.events = []


class WriteBehind:
    """The engine, the write-behind queue and its writer thread: the base of ``Store``.

    ``Store(url)`` with ``sqlite:///path.db`` or ``postgresql+psycopg://…`` (default: configured).
    The writer thread starts on ``start()`` or on the first write, whichever comes first
    (``autostart=False``: only on ``start()``/``flush()``, so that writes pile up and coalesce).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        batch_max: int = 2000,
        coalesce_s: float = 0.05,
        busy_timeout_ms: int = 5000,
        retry_max_backoff_s: float = 2.0,
        autostart: bool = True,
        echo: bool = False,
        replica: str | None = None,
    ) -> None:
        self.url = normalize_url(url or default_url())
        # Stamped on every instance and request row written through this store (crash recovery).
        self.replica = replica
        self.batch_max = batch_max
        self.coalesce_s = coalesce_s
        self._upserts: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._wake = threading.Event()
        self.retry_max_backoff_s = retry_max_backoff_s
        self.autostart = autostart
        self.dialect = make_url(self.url).get_backend_name()
        self._memory = is_memory_sqlite(self.url)
        prepare_sqlite_path(self.url)

        kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _json_dumps}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
            if self._memory:
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            memory = self._memory

            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                    cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                cur.close()

        # A shared in-memory SQLite connection must not be used by two threads at once.
        self._db_lock: threading.RLock | None = threading.RLock() if self._memory else None
        self._insert = self._insert_factory()

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._saw_stop = False
        self._lost_since_flush = False  # a row was dropped since the last flush marker was answered
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._closed = False
        self._stop_deadline: float | None = None
        self._stats = {"enqueued": 0, "written": 0, "commits": 0, "retries": 0, "dropped": 0}
        self.last_error: str | None = None
        ref = weakref.ref(self)
        self._atexit = lambda: (s := ref()) is not None and s.close(timeout=5.0)
        atexit.register(self._atexit)

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"

    def __enter__(self) -> WriteBehind:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _db(self) -> Iterator[None]:
        with self._db_lock if self._db_lock is not None else nullcontext():
            yield

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> WriteBehind:
        """Start the background writer (idempotent)."""
        with self._state_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tetri-store-writer", daemon=True)
                self._thread.start()
        return self

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until everything enqueued before this call is committed. False on timeout, or when
        the writer had to drop a row (one no retry can write) since the previous flush."""
        if self._closed:
            return True
        if self._thread is None:
            if self._queue.empty():
                return True
            self.start()
        marker = _Flush()
        self._queue.put(marker)
        self._wake.set()
        return marker.done.wait(timeout) and marker.ok

    def close(self, timeout: float = 10.0) -> bool:
        """Flush, stop the writer and release connections (idempotent). True when all was written."""
        with self._state_lock:
            if self._closed:
                return True
            self._closed = True
            thread = self._thread
        atexit.unregister(self._atexit)
        ok = True
        if thread is not None and thread.is_alive():
            self._stop_deadline = time.monotonic() + timeout
            marker = _Flush()
            self._queue.put(marker)
            self._queue.put(_STOP)
            self._wake.set()
            thread.join(timeout + 1.0)
            ok = marker.done.is_set() and marker.ok and not thread.is_alive()
        # Anything that raced in after the stop marker (or with no writer ever started).
        leftovers = _Pending()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, tuple):
                leftovers.add(item)
            elif isinstance(item, _Flush):
                item.done.set()
        if len(leftovers):
            ok = self._write_now(leftovers) and ok
        self.engine.dispose()
        return ok

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        """Writer counters: enqueued, written (rows after coalescing), commits, retries, dropped,
        queued (approximate backlog) and the last error seen."""
        return {**self._stats, "queued": self._queue.qsize(), "last_error": self.last_error}

    # ----------------------------------------------------------------------- writes (non-blocking)

    def save_instance(self, id: str, **fields: Any) -> None:
        """Upsert an instance: backend, role, state, url, model, capacity_kv_tokens, last_load
        (dict), last_seen. Only the given fields change."""
        bad = fields.keys() - _INSTANCE_FIELDS
        if bad:
            raise ValueError(f"unknown instance fields: {sorted(bad)}")
        row = {k: _clean(v) for k, v in fields.items()}
        row["updated_at"] = time.time()
        if self.replica is not None:
            row.setdefault("replica", self.replica)
        self._put(("i", str(id), row))

    def save_request(self, id: str, **fields: Any) -> None:
        """Upsert a request row with any of its columns (docs/contracts.md). Only the given fields
        change; a field passed as None is written as NULL."""
        bad = fields.keys() - _REQUEST_FIELDS
        if bad:
            raise ValueError(f"unknown request fields: {sorted(bad)}")
        row = {k: v if type(v) in _PLAIN_TYPES else _clean(v) for k, v in fields.items()}
        if self.replica is not None:
            row.setdefault("replica", self.replica)
        self._put(("r", str(id), row))

    def add_event(
        self,
        kind: str,
        instance_id: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
        duration_s: float | None = None,
        *,
        at: float | None = None,
    ) -> None:
        """Record an event (flip, drain, register, deregister, unhealthy, scale, …). ``at`` defaults
        to now; ``duration_s`` is how long the action took."""
        row = {
            "at": time.time() if at is None else float(at),
            "kind": str(kind),
            "instance_id": None if instance_id is None else str(instance_id),
            "request_id": None if request_id is None else str(request_id),
            "detail": _clean(detail),
            "duration_s": None if duration_s is None else float(duration_s),
        }
        self._put(("e", row))

    def _put(self, item: tuple) -> None:
        self._stats["enqueued"] += 1
        if self._closed:
            # Late writes during shutdown: write them through rather than lose them.
            pending = _Pending()
            pending.add(item)
            self._write_now(pending)
            return
        self._queue.put(item)
        if self._thread is None and self.autostart:
            try:
                self.start()
            except RuntimeError:  # closed meanwhile: close() drains the queue
                pass

    # ----------------------------------------------------------------------- writer thread

    def _run(self) -> None:
        pending = _Pending()
        markers: list[_Flush] = []
        stop = False
        backoff = 0.0
        while True:
            if not len(pending) and not markers and not stop:
                if self.coalesce_s > 0:
                    # Writes never wake this thread (a wake-up per write costs the event loop a GIL
                    # hand-off): it looks every coalesce_s, so a request's several saves become one
                    # upsert, and at once when flush() or close() asks.
                    self._wake.wait(self.coalesce_s)
                    self._wake.clear()
                else:
                    self._absorb(self._queue.get(), pending, markers)  # block while idle
            n = 0
            while n < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._absorb(item, pending, markers)
                n += 1
            stop = stop or self._saw_stop
            if len(pending):
                try:
                    self._write(pending)
                    pending.clear()
                    backoff = 0.0
                except Exception as exc:  # noqa: BLE001
                    self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    if _is_transient(exc):
                        give_up = stop and self._stop_deadline is not None and (time.monotonic() > self._stop_deadline)
                        if not give_up:
                            self._stats["retries"] += 1
                            backoff = min(self.retry_max_backoff_s, max(0.02, backoff * 2))
                            log.warning("store write failed, retrying in %.2fs: %s", backoff, exc)
                            time.sleep(backoff)
                            continue  # keep the batch; absorb more and retry
                        log.error("store closing: dropping %d unwritten rows: %s", len(pending), exc)
                        self._stats["dropped"] += len(pending)
                        self._lost_since_flush = True
                        pending.clear()
                    else:
                        log.error("store write failed (%s); writing rows one by one", exc)
                        pending = self._write_isolated(pending)
                        if len(pending):  # transient trouble while isolating: retry later
                            self._stats["retries"] += 1
                            time.sleep(min(self.retry_max_backoff_s, 0.1))
                            continue
            if markers:
                lost, self._lost_since_flush = self._lost_since_flush, False
                for m in markers:
                    m.ok = not lost
                    m.done.set()
            markers.clear()
            if stop:
                return

    def _absorb(self, item: Any, pending: _Pending, markers: list[_Flush]) -> None:
        if isinstance(item, tuple):
            pending.add(item)
        elif isinstance(item, _Flush):
            markers.append(item)
        elif item is _STOP:
            self._saw_stop = True

    def _write_now(self, pending: _Pending) -> bool:
        try:
            self._write(pending)
            return True
        except Exception as exc:  # noqa: BLE001
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("store write after close failed; %d rows lost: %s", len(pending), exc)
            self._stats["dropped"] += len(pending)
            return False

    def _write_isolated(self, pending: _Pending) -> _Pending:
        """After a non-transient failure: write each row alone, drop (and log) the bad ones,
        return the rows that met a transient error."""
        retry = _Pending()
        singles: list[tuple] = [("i", k, v) for k, v in pending.instances.items()]
        singles += [("r", k, v) for k, v in pending.requests.items()]
        singles += [("e", v) for v in pending.events]
        for item in singles:
            one = _Pending()
            one.add(item)
            try:
                self._write(one)
            except Exception as exc:  # noqa: BLE001
                if _is_transient(exc):
                    retry.add(item)
                else:
                    self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    log.error("store dropped a bad row %r: %s", item[:2], exc)
                    self._stats["dropped"] += 1
                    self._lost_since_flush = True
        return retry

    def _insert_factory(self) -> Callable[[Table], Any] | None:
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert
        return None  # generic fallback: UPDATE, then INSERT when nothing matched

    def _write(self, pending: _Pending) -> None:
        now = time.time()
        instances = []
        for id_, fields in pending.instances.items():
            row = {"id": id_, **fields}
            row.setdefault("updated_at", now)
            row.setdefault("created_at", row["updated_at"])
            instances.append(row)
        requests = [{"id": id_, **fields} for id_, fields in pending.requests.items()]
        with self._db(), self.engine.begin() as conn:
            self._upsert(conn, INSTANCES, instances, keep_on_update=("id", "created_at"))
            self._upsert(conn, REQUESTS, requests, keep_on_update=("id",))
            if pending.events:
                conn.execute(insert(EVENTS), pending.events)
        self._stats["written"] += len(pending)
        self._stats["commits"] += 1

    def _upsert(self, conn: Any, table: Table, rows: list[dict[str, Any]], keep_on_update: tuple) -> None:
        if not rows:
            return
        # Rows with the same column set share one executemany; sorted ids keep lock order stable.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for row in sorted(rows, key=lambda r: r["id"]):
            groups[tuple(sorted(row))].append(row)
        for cols, group in groups.items():
            update_cols = [c for c in cols if c not in keep_on_update]
            if self._insert is None:
                self._upsert_generic(conn, table, group, update_cols)
                continue
            conn.execute(self._upsert_statement(table, cols, tuple(update_cols)), group)

    def _upsert_statement(self, table: Table, cols: tuple[str, ...], update_cols: tuple[str, ...]) -> Any:
        """The dialect's upsert for one column set, built once: a request's few shapes of save repeat
        for every request, and building the construct costs more than executing it."""
        key = (table.name, cols)
        stmt = self._upserts.get(key)
        if stmt is None:
            assert self._insert is not None
            stmt = self._insert(table)
            if update_cols:
                stmt = stmt.on_conflict_do_update(
                    index_elements=[table.c.id], set_={c: stmt.excluded[c] for c in update_cols}
                )
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=[table.c.id])
            self._upserts[key] = stmt
        return stmt

    @staticmethod
    def _upsert_generic(conn: Any, table: Table, group: list[dict[str, Any]], update_cols: list[str]) -> None:
        for row in group:
            matched = 0
            if update_cols:
                res = conn.execute(
                    update(table).where(table.c.id == row["id"]).values({c: row[c] for c in update_cols})
                )
                matched = res.rowcount
            else:
                matched = conn.execute(select(func.count()).where(table.c.id == row["id"])).scalar_one()
            if not matched:
                conn.execute(insert(table).values(row))
