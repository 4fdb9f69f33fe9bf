"""Metering and cost: usage records, replica cost intervals, replica utilisation samples.

Revision ID: 0004
Revises: 0003
Create Date: 2025-04-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "usage_records",
        # One row per request id: a retried write is a no-op (idempotent metering).
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(80), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("route", sa.String(16), nullable=False),
        sa.Column("replica_id", sa.String(128), nullable=True),
        sa.Column("pool", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        _time("started_at"),
        _time("ended_at"),
        sa.Column("ttft_ms", sa.Integer(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        # What the request was charged at settlement (budgets), in micro-dollars.
        sa.Column("charged_usd_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_usage_records"),
    )
    op.create_index("ix_usage_records_tenant_id_ended_at", "usage_records", ["tenant_id", "ended_at"])
    op.create_index("ix_usage_records_ended_at", "usage_records", ["ended_at"])
    op.create_table(
        "replica_intervals",
        # A replica's life at one price: opened when it starts, closed when it stops. ``owner`` is
        # the gateway instance that runs it (local) or "static"; (owner, replica_id, started_at) is unique.
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("replica_id", sa.String(128), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("engine", sa.String(16), nullable=False),
        sa.Column("instance_type", sa.String(64), nullable=True),
        sa.Column("region", sa.String(64), nullable=True),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("usd_per_hour", sa.Float(), nullable=False),
        _time("started_at"),
        _time("ended_at", nullable=True),
        # While open, the owner bumps this; an interval whose owner died is closed at its last heartbeat.
        _time("heartbeat_at"),
        sa.PrimaryKeyConstraint("id", name="pk_replica_intervals"),
    )
    op.create_index("uq_replica_intervals_owner_replica_id_started_at", "replica_intervals",
                    ["owner", "replica_id", "started_at"], unique=True)
    op.create_index("ix_replica_intervals_started_at", "replica_intervals", ["started_at"])
    op.create_table(
        "replica_samples",
        # Engine signals sampled over time (for right-sizing advice and the planner).
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("replica_id", sa.String(128), nullable=False),
        _time("at"),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("running", sa.Float(), nullable=True),
        sa.Column("waiting", sa.Float(), nullable=True),
        sa.Column("kv_cache_usage", sa.Float(), nullable=True),
        sa.Column("busy_fraction", sa.Float(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("owner", "replica_id", "at", name="pk_replica_samples"),
    )
    op.create_index("ix_replica_samples_at", "replica_samples", ["at"])


def downgrade() -> None:
    op.drop_index("ix_replica_samples_at", table_name="replica_samples")
    op.drop_table("replica_samples")
    op.drop_index("ix_replica_intervals_started_at", table_name="replica_intervals")
    op.drop_index("uq_replica_intervals_owner_replica_id_started_at", table_name="replica_intervals")
    op.drop_table("replica_intervals")
    op.drop_index("ix_usage_records_ended_at", table_name="usage_records")
    op.drop_index("ix_usage_records_tenant_id_ended_at", table_name="usage_records")
    op.drop_table("usage_records")
