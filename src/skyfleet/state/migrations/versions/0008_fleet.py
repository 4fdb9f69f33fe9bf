"""Fleet controller: the policy state per model, and the history of its decisions.

Revision ID: 0008
Revises: 0007
Create Date: 2025-06-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fleet_state",
        # The scaling policy's state of one model (JSON, skyfleet.fleet.policy.base.PolicyState), saved
        # after each decision so that a restarted controller resumes without churn.
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_fleet_state"),
    )
    op.create_table(
        "fleet_decisions",
        # Every decision with the numbers it was made from (JSON of numbers only) and why.
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("decision", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fleet_decisions"),
    )
    op.create_index("ix_fleet_decisions_model_at", "fleet_decisions", ["model", "at"])
    op.create_index("ix_fleet_decisions_at", "fleet_decisions", ["at"])


def downgrade() -> None:
    op.drop_index("ix_fleet_decisions_at", table_name="fleet_decisions")
    op.drop_index("ix_fleet_decisions_model_at", table_name="fleet_decisions")
    op.drop_table("fleet_decisions")
    op.drop_table("fleet_state")
