"""The SQL store: write-behind writes, synchronous reads, leases, Alembic migrations.

``Store`` puts together, by concept: the writer (``writer.py``: the queue, the writer thread, the
upserts), the reads (``reads.py``), and what several replicas share (``leases.py``: the leader
lease, the replicas' heartbeats, crash recovery). URLs and migrations are in ``urls.py``.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.store.leases import Leases
from orchestrator.store.reads import Reads
from orchestrator.store.urls import (  # noqa: F401 - the names this module always exported
    alembic_config,
    default_url,
    head_revision,
    migrations_dir,
    normalize_url,
    prepare_sqlite_path,
)
from orchestrator.store.writer import WriteBehind

# Replicas starting together on one PostgreSQL database migrate one at a time.
_MIGRATION_LOCK_KEY = 0x7E7121


class Store(Reads, Leases, WriteBehind):
    """SQL store of instances, requests, events, leases and replicas (see docs/contracts.md, "Store").

    ``Store(url)`` with ``sqlite:///path.db`` or ``postgresql+psycopg://…`` (default: configured).
    The writer thread starts on ``start()`` or on the first write, whichever comes first
    (``autostart=False``: only on ``start()``/``flush()``, so that writes pile up and coalesce).
    """

    def __enter__(self) -> Store:
        self.start()
        return self

    def upgrade(self, revision: str = "head") -> None:
        """``alembic upgrade head`` on this store's database, configured in code."""
        from alembic import command

        cfg = alembic_config(self.url)
        with self._db(), self.engine.begin() as conn:
            if self.dialect == "postgresql":  # held until this transaction ends
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self._db(), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()


def db_upgrade_command(url: str | None = None) -> str:
    """``tetri db upgrade``: bring the database at ``url`` (default: configured) to the head
    revision. Returns a one-line summary for the CLI to print."""
    store = Store(url)
    try:
        store.upgrade()
        rev = store.current_revision()
    finally:
        store.close()
    shown = make_url(store.url).render_as_string(hide_password=True)
    return f"database {shown} is at revision {rev}"
