"""Leases, replica heartbeats and crash recovery: what several orchestrator replicas share.

Times here are the database's clock, never a replica's: replicas on several hosts compare one
clock, so a skewed host cannot steal a live leader's lease or declare a live peer dead. Every
statement is a single conditional UPDATE (or an INSERT that does nothing on conflict), atomic on
SQLite (one writer at a time) and on PostgreSQL (the row lock; a concurrent claimer re-reads the
row after the winner commits and no longer matches).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Float, Table, case, cast, delete, func, literal, select, update
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.store.models import INFLIGHT_STATES, LeaseRow, ReplicaRow
from orchestrator.store.writer import INSTANCES, REQUESTS

LEASES: Table = LeaseRow.__table__  # type: ignore[assignment]
REPLICAS: Table = ReplicaRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Lease:
    """A lease as a claim left it: ``held`` by the caller or not; who holds it and until when."""

    name: str
    held: bool
    holder: str | None
    term: int
    expires_at: float
    now: float  # the database's clock at the claim: expires_at - now is what is left


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's wall clock in UNIX seconds, as a SQL expression."""
    if dialect == "postgresql":
        # clock_timestamp(), not now(): now() is the transaction's start.
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    if dialect == "sqlite":
        return cast((func.julianday("now") - 2440587.5) * 86400.0, Float)
    return literal(time.time(), Float)  # another database: the caller's clock


class Leases:
    """The leader lease, the replicas' heartbeats and recovery of what a dead replica left."""

    engine: Engine
    dialect: str
    flush: Callable[..., bool]
    _db: Callable[[], AbstractContextManager[None]]
    _insert: Callable[[Table], Any] | None

    # ----------------------------------------------------------------------- the leader lease

    def claim_lease(self, name: str, holder: str, token: str, ttl_s: float) -> Lease:
        """Take the lease ``name`` if it is free or expired, or renew it if ``token`` holds it, for
        ``ttl_s`` seconds. Synchronous, committed on return; says whether the caller holds it."""
        now = db_now(self.dialect)
        c = LEASES.c
        mine = c.token == token
        with self._db(), self.engine.begin() as conn:
            taken = conn.execute(
                update(LEASES)
                .where(c.name == name, mine | (c.expires_at < now))
                .values(
                    holder=holder, token=token, expires_at=now + ttl_s, renewed_at=now,
                    term=case((mine, c.term), else_=c.term + 1),
                    acquired_at=case((mine, c.acquired_at), else_=now),
                )
            ).rowcount  # fmt: skip
            if not taken:  # no row yet: the first claim creates it
                values = {"name": name, "holder": holder, "token": token, "term": 1, "expires_at": now + ttl_s,
                          "acquired_at": now, "renewed_at": now}  # fmt: skip
                conn.execute(self._insert_ignore(LEASES, ["name"]).values(values))
            row = conn.execute(select(LEASES, now.label("now")).where(c.name == name)).mappings().one()
        return Lease(name, row["token"] == token and row["expires_at"] > row["now"], row["holder"],
                     int(row["term"]), float(row["expires_at"]), float(row["now"]))  # fmt: skip

    def release_lease(self, name: str, token: str) -> bool:
        """Give the lease up at once (a clean stop): a peer takes it on its next claim, not after
        the lease would have expired. False when ``token`` did not hold it."""
        c = LEASES.c
        with self._db(), self.engine.begin() as conn:
            res = conn.execute(update(LEASES).where(c.name == name, c.token == token).values(expires_at=0.0))
        return bool(res.rowcount)

    def get_lease(self, name: str) -> dict[str, Any] | None:
        with self._db(), self.engine.connect() as conn:
            row = conn.execute(select(LEASES).where(LEASES.c.name == name)).mappings().first()
        return dict(row) if row is not None else None

    # ----------------------------------------------------------------------- replica heartbeats

    def join_replicas(self, replica: str, token: str, host: str | None, timeout_s: float) -> bool:
        """Record this process as replica ``replica`` (a fresh ``token`` per start). False while a
        live process (heartbeat within ``timeout_s``) holds the id: two live replicas must not share
        one, or each would take the other's requests for its own."""
        now = db_now(self.dialect)
        c = REPLICAS.c
        with self._db(), self.engine.begin() as conn:
            res = conn.execute(
                update(REPLICAS)
                .where(c.id == replica, (c.token == token) | (c.heartbeat_at < now - timeout_s))
                .values(token=token, host=host, started_at=now, heartbeat_at=now)
            )
            if res.rowcount:
                return True
            values = {"id": replica, "token": token, "host": host, "started_at": now, "heartbeat_at": now}
            # RETURNING, not rowcount: psycopg reports no usable rowcount for a skipped INSERT.
            inserted = conn.execute(self._insert_ignore(REPLICAS, ["id"]).values(values).returning(c.id)).first()
            return inserted is not None

    def heartbeat(self, replica: str, token: str) -> bool:
        """Renew this replica's heartbeat. False when its row is gone (the leader declared it dead
        after a long stall) or taken by another process: the caller joins again."""
        c = REPLICAS.c
        with self._db(), self.engine.begin() as conn:
            res = conn.execute(
                update(REPLICAS).where(c.id == replica, c.token == token).values(heartbeat_at=db_now(self.dialect))
            )
        return bool(res.rowcount)

    def leave_replicas(self, replica: str, token: str) -> None:
        """A clean stop: this replica's row goes (its requests finished or were failed by itself)."""
        c = REPLICAS.c
        with self._db(), self.engine.begin() as conn:
            conn.execute(delete(REPLICAS).where(c.id == replica, c.token == token))

    def live_replicas(self, timeout_s: float) -> list[dict[str, Any]]:
        """Replicas whose heartbeat is within ``timeout_s``, by id."""
        c = REPLICAS.c
        q = select(REPLICAS).where(c.heartbeat_at >= db_now(self.dialect) - timeout_s).order_by(c.id)
        with self._db(), self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    # ----------------------------------------------------------------------- crash recovery

    def recover(self, replica: str | None, error: str) -> dict[str, int]:
        """At start: fail the requests a previous run of ``replica`` left in flight (state
        ``failed``, ``error`` stated, finished now) and mark its instance rows that are not
        ``removed`` as ``unknown`` until they are registered again. Synchronous, committed on return.

        Only rows stamped with ``replica`` (or with no replica: written before the column existed)
        are touched, so replicas sharing one database never fail each other's live requests. Call it
        after ``join_replicas`` succeeded: then no live process holds the id."""
        self.flush()
        with self._db(), self.engine.begin() as conn:
            return self._fail_replica(conn, replica, error, include_unstamped=True)

    def recover_dead_replicas(self, timeout_s: float, error: str) -> list[dict[str, Any]]:
        """The leader's reconciliation: for every replica whose heartbeat is older than
        ``timeout_s``, fail its in-flight requests, mark its instance rows ``unknown`` (a live
        replica that drives the same instance claims the row back on its next sync) and delete its
        replica row. One transaction per dead replica; returns what was done for each."""
        c = REPLICAS.c
        q = select(c.id, c.token).where(c.heartbeat_at < db_now(self.dialect) - timeout_s).order_by(c.id)
        with self._db(), self.engine.connect() as conn:
            dead = [(r.id, r.token) for r in conn.execute(q)]
        done = []
        for replica, token in dead:
            with self._db(), self.engine.begin() as conn:
                # Only if still dead and the same process: it may have come back, or restarted, meanwhile.
                gone = conn.execute(
                    delete(REPLICAS).where(
                        c.id == replica, c.token == token, c.heartbeat_at < db_now(self.dialect) - timeout_s
                    )
                ).rowcount
                if gone:
                    done.append({"replica": replica, **self._fail_replica(conn, replica, error)})
        return done

    def _fail_replica(self, conn: Any, replica: str | None, error: str, include_unstamped: bool = False) -> dict:
        now = time.time()
        r, i = REQUESTS.c, INSTANCES.c
        if replica is None:
            mine_r, mine_i = r.replica.is_(None), i.replica.is_(None)
        elif include_unstamped:
            mine_r = (r.replica == replica) | r.replica.is_(None)
            mine_i = (i.replica == replica) | i.replica.is_(None)
        else:
            mine_r, mine_i = r.replica == replica, i.replica == replica
        failed = conn.execute(
            update(REQUESTS)
            .where(r.state.in_(INFLIGHT_STATES), mine_r)
            .values(
                state="failed", error=func.coalesce(r.error, error),
                finish_reason=func.coalesce(r.finish_reason, "error"),
                finished_at=func.coalesce(r.finished_at, now),
            )
        ).rowcount  # fmt: skip
        stale = conn.execute(
            update(INSTANCES)
            .where(i.state.is_(None) | i.state.not_in(("removed", "unknown")), mine_i)
            .values(state="unknown", updated_at=now)
        ).rowcount
        return {"requests_failed": int(failed or 0), "instances_unknown": int(stale or 0)}

    def _insert_ignore(self, table: Table, keys: list[str]) -> Any:
        """INSERT … ON CONFLICT DO NOTHING on the key: rowcount 0 when the row already existed."""
        if self._insert is None:
            raise NotImplementedError(f"leases need SQLite or PostgreSQL, not {self.dialect}")
        return self._insert(table).on_conflict_do_nothing(index_elements=[table.c[k] for k in keys])
