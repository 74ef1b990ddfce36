"""cached_tokens on requests (prefix caching: prompt tokens served from an engine's cache)

Revision ID: 0003_cached_tokens
Revises: 0002_replica
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_cached_tokens"
down_revision: str | None = "0002_replica"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: ADD COLUMN on both SQLite and PostgreSQL, no table rewrite. NULL: the engine
    # reported none (no prefix cache), or the row predates this revision.
    op.add_column("requests", sa.Column("cached_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("cached_tokens")
