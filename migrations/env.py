"""Alembic environment of the tetri store.

Run programmatically by ``orchestrator.store.Store.upgrade()`` / ``tetri db upgrade``, which pass
an open connection in ``config.attributes["connection"]``; or by hand with
``alembic -c migrations/alembic.ini [-x url=URL] upgrade head``.
"""

from __future__ import annotations

import logging.config
import os

from alembic import context
from sqlalchemy import create_engine, pool

from orchestrator.store.models import Base

config = context.config
target_metadata = Base.metadata

# Only the command-line `alembic` configures logging from the ini; programmatic runs (the
# orchestrator, tests) keep the application's logging as it is.
if config.config_file_name is not None and not config.attributes.get("connection"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        url = os.environ.get("TETRI_DATABASE_URL")
    if not url:
        from orchestrator.config import Settings

        url = Settings.load().database_url
    from orchestrator.store.urls import normalize_url

    return normalize_url(url)


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode makes future migrations portable.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from orchestrator.store.urls import prepare_sqlite_path

    url = _url()
    prepare_sqlite_path(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
