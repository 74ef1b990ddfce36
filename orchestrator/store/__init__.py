"""The SQL store (write-behind writes, synchronous reads, leases) and its Alembic migrations."""

from orchestrator.store.leases import Lease
from orchestrator.store.models import (
    EVENT_KINDS,
    INFLIGHT_STATES,
    REQUEST_STATES,
    Base,
    EventRow,
    InstanceRow,
    LeaseRow,
    ReplicaRow,
    RequestRow,
)
from orchestrator.store.store import Store, db_upgrade_command
from orchestrator.store.urls import alembic_config, default_url, head_revision, migrations_dir

__all__ = [
    "EVENT_KINDS",
    "INFLIGHT_STATES",
    "REQUEST_STATES",
    "Base",
    "EventRow",
    "InstanceRow",
    "Lease",
    "LeaseRow",
    "ReplicaRow",
    "RequestRow",
    "Store",
    "alembic_config",
    "db_upgrade_command",
    "default_url",
    "head_revision",
    "migrations_dir",
]
