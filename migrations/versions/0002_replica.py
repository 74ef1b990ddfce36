"""replica column on instances and requests (crash recovery)

Revision ID: 0002_replica
Revises: 0001_initial
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_replica"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: ADD COLUMN on both SQLite and PostgreSQL, no table rewrite.
    op.add_column("instances", sa.Column("replica", sa.String(length=64), nullable=True))
    op.add_column("requests", sa.Column("replica", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("replica")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("replica")
