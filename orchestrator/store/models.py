"""SQLAlchemy 2 models of the store: instances, requests, events, leases and replicas.

Times are UNIX seconds (float), as everywhere in tetri. The Alembic migration in
``migrations/versions`` creates exactly these tables; ``tests/integration/test_store.py`` checks that the
migrated schema and these models agree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.request import IN_FLIGHT_STATES
from orchestrator.request import REQUEST_STATES as _REQUEST_STATES

# SQLite only autoincrements an ``INTEGER PRIMARY KEY`` (rowid alias), not a BIGINT one.
EventId = BigInteger().with_variant(Integer(), "sqlite")

# A request's states are RequestState's (orchestrator/request.py); in-flight ones are not terminal:
# after a crash nobody will finish them.
REQUEST_STATES = _REQUEST_STATES
INFLIGHT_STATES = IN_FLIGHT_STATES
EVENT_KINDS = ("flip", "drain", "register", "deregister", "unhealthy", "healthy", "scale", "recover", "leader")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class InstanceRow(Base):
    """An engine instance the orchestrator drives (one row per instance id)."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    backend: Mapped[str | None] = mapped_column(String(32))
    role: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str | None] = mapped_column(String(32))
    url: Mapped[str | None] = mapped_column(String(512))
    model: Mapped[str | None] = mapped_column(String(256))
    capacity_kv_tokens: Mapped[int | None] = mapped_column(BigInteger)
    last_load: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_seen: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # The orchestrator replica (Settings.replica_id) that drives it; NULL: written before 0002.
    replica: Mapped[str | None] = mapped_column(String(64))
    # Its adapter options without secrets (0004): what another replica needs to register it too.
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RequestRow(Base):
    """One client request: where it ran, its timings, and the predictor's guess next to the truth."""

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(256))
    backend: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str | None] = mapped_column(String(16))
    prefill_instance: Mapped[str | None] = mapped_column(String(128))
    decode_instance: Mapped[str | None] = mapped_column(String(128))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    # Prompt tokens the engine served from its prefix cache (0003); NULL: the engine reported none.
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    predicted_bucket: Mapped[int | None] = mapped_column(Integer)
    predictor_granularity: Mapped[int | None] = mapped_column(Integer)
    arrival: Mapped[float | None] = mapped_column(Float)
    prefill_started_at: Mapped[float | None] = mapped_column(Float)
    first_token_at: Mapped[float | None] = mapped_column(Float)
    decode_started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    kv_bytes: Mapped[int | None] = mapped_column(BigInteger)
    kv_transfer_s: Mapped[float | None] = mapped_column(Float)
    # The orchestrator replica that served it: crash recovery only fails its own replica's requests.
    replica: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_requests_state", "state"),
        Index("ix_requests_arrival", "arrival"),
    )


class EventRow(Base):
    """Something that happened to the cluster: flip, drain, register, deregister, unhealthy, scale…"""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    instance_id: Mapped[str | None] = mapped_column(String(128))
    request_id: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    duration_s: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_events_kind", "kind"),
        Index("ix_events_at", "at"),
        Index("ix_events_instance_id", "instance_id"),
    )


class LeaseRow(Base):
    """A named lease (the leader's): held by one replica until ``expires_at``, in the database's clock.

    ``term`` grows by one each time the lease changes hands: a number a leader can stamp on what it
    does (fencing), and what tests read to count takeovers."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64))
    # The holding process (a fresh token per start): a restarted replica with the same id is a new holder.
    token: Mapped[str | None] = mapped_column(String(64))
    term: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[float | None] = mapped_column(Float)
    renewed_at: Mapped[float | None] = mapped_column(Float)


class ReplicaRow(Base):
    """A live orchestrator replica: its heartbeat, renewed every few seconds. The leader fails the
    in-flight requests of a replica whose heartbeat expired, then deletes its row."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)


INSTANCE_COLUMNS = frozenset(c.name for c in InstanceRow.__table__.columns)
REQUEST_COLUMNS = frozenset(c.name for c in RequestRow.__table__.columns)
EVENT_COLUMNS = frozenset(c.name for c in EventRow.__table__.columns)
