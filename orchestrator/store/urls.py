"""Database URLs and the Alembic migrations of the store, configured in code."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url


def default_url() -> str:
    """``TETRI_DATABASE_URL``, else the configured default (a SQLite file in the cache dir)."""
    url = os.environ.get("TETRI_DATABASE_URL")
    if url:
        return url
    from orchestrator.config import Settings

    return Settings.load().database_url


def normalize_url(url: str) -> str:
    """Pick the driver we ship for bare PostgreSQL URLs (``postgres://``, ``postgresql://``)."""
    u = make_url(url)
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def is_memory_sqlite(url: str) -> bool:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return False
    db = u.database or ""
    return db in ("", ":memory:") or "mode=memory" in db or u.query.get("mode") == "memory"


def prepare_sqlite_path(url: str) -> None:
    """Create the parent directory of a SQLite file if needed (no-op for other databases)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or is_memory_sqlite(url):
        return
    db = u.database or ""
    if db.startswith("file:"):
        db = db[len("file:") :].split("?", 1)[0]
    Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)


def migrations_dir() -> Path:
    """The ``migrations/`` directory, in a source checkout or next to the installed package."""
    candidates = [Path(__file__).resolve().parents[2] / "migrations"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("migrations")
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    for path in candidates:
        if (path / "env.py").is_file() and (path / "versions").is_dir():
            return path
    raise FileNotFoundError(f"tetri migrations not found (looked in {', '.join(map(str, candidates))})")


def alembic_config(url: str):
    """An Alembic ``Config`` built in code: works from any cwd and from an installed wheel."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
