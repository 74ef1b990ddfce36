"""instances, requests and events

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-23 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=True),
        sa.Column("url", sa.String(length=512), nullable=True),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("capacity_kv_tokens", sa.BigInteger(), nullable=True),
        sa.Column("last_load", sa.JSON(), nullable=True),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("backend", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=True),
        sa.Column("prefill_instance", sa.String(length=128), nullable=True),
        sa.Column("decode_instance", sa.String(length=128), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("predicted_bucket", sa.Integer(), nullable=True),
        sa.Column("predictor_granularity", sa.Integer(), nullable=True),
        sa.Column("arrival", sa.Float(), nullable=True),
        sa.Column("prefill_started_at", sa.Float(), nullable=True),
        sa.Column("first_token_at", sa.Float(), nullable=True),
        sa.Column("decode_started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("kv_bytes", sa.BigInteger(), nullable=True),
        sa.Column("kv_transfer_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requests")),
    )
    op.create_index("ix_requests_state", "requests", ["state"], unique=False)
    op.create_index("ix_requests_arrival", "requests", ["arrival"], unique=False)
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("instance_id", sa.String(length=128), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_kind", "events", ["kind"], unique=False)
    op.create_index("ix_events_at", "events", ["at"], unique=False)
    op.create_index("ix_events_instance_id", "events", ["instance_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_events_instance_id", table_name="events")
    op.drop_index("ix_events_at", table_name="events")
    op.drop_index("ix_events_kind", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_requests_arrival", table_name="requests")
    op.drop_index("ix_requests_state", table_name="requests")
    op.drop_table("requests")
    op.drop_table("instances")
