"""Budgets: definitions per tenant and per key, counters per period window, in-flight reservations.

Revision ID: 0005
Revises: 0004
Create Date: 2025-04-15 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        # NULL: the tenant's own budget; else one API key's.
        sa.Column("key_id", sa.String(32), nullable=True),
        # key_id, or "tenant": unique with (tenant_id, period) on every backend (NULLs are distinct).
        sa.Column("subject", sa.String(32), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        # Micro-dollars; NULL: no such limit.
        sa.Column("soft_limit_usd_micros", sa.BigInteger(), nullable=True),
        sa.Column("hard_limit_usd_micros", sa.BigInteger(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_budgets_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_budgets_key_id_api_keys",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_budgets"),
    )
    op.create_index("uq_budgets_tenant_id_subject_period", "budgets", ["tenant_id", "subject", "period"],
                    unique=True)
    op.create_table(
        "budget_counters",
        # One row per (budget, period window): spend and in-flight reservations, micro-dollars.
        sa.Column("budget_id", sa.String(32), nullable=False),
        _time("period_start"),
        sa.Column("spent_usd_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_usd_micros", sa.BigInteger(), nullable=False),
        # The soft-limit alert of this window was sent (once, whichever gateway got there first).
        _time("alerted_at", nullable=True),
        sa.ForeignKeyConstraint(["budget_id"], ["budgets.id"], name="fk_budget_counters_budget_id_budgets",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("budget_id", "period_start", name="pk_budget_counters"),
    )
    op.create_table(
        "budget_reservations",
        # A request's reservation on one counter; released at settlement, or after expires_at
        # (the gateway that made it crashed).
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("budget_id", sa.String(32), nullable=False),
        _time("period_start"),
        sa.Column("amount_usd_micros", sa.BigInteger(), nullable=False),
        _time("expires_at"),
        sa.ForeignKeyConstraint(["budget_id"], ["budgets.id"],
                                name="fk_budget_reservations_budget_id_budgets", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", "budget_id", name="pk_budget_reservations"),
    )
    op.create_index("ix_budget_reservations_expires_at", "budget_reservations", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_budget_reservations_expires_at", table_name="budget_reservations")
    op.drop_table("budget_reservations")
    op.drop_table("budget_counters")
    op.drop_index("uq_budgets_tenant_id_subject_period", table_name="budgets")
    op.drop_table("budgets")
