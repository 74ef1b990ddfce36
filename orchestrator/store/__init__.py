"""The SQL store (write-behind writes, synchronous reads) and its Alembic migrations."""

from orchestrator.store.models import (
    EVENT_KINDS,
    INFLIGHT_STATES,
    REQUEST_STATES,
    Base,
    EventRow,
    InstanceRow,
    RequestRow,
)
from orchestrator.store.store import (
    Store,
    alembic_config,
    db_upgrade_command,
    default_url,
    head_revision,
    migrations_dir,
)

__all__ = [
    "EVENT_KINDS",
    "INFLIGHT_STATES",
    "REQUEST_STATES",
    "Base",
    "EventRow",
    "InstanceRow",
    "RequestRow",
    "Store",
    "alembic_config",
    "db_upgrade_command",
    "default_url",
    "head_revision",
    "migrations_dir",
]
