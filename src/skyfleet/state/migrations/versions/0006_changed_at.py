"""When a key or tenant last changed, so every gateway drops its cached credentials at once.

Revision ID: 0006
Revises: 0005
Create Date: 2025-05-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("api_keys", "tenants"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))
        op.create_index(f"ix_{table}_changed_at", table, ["changed_at"])


def downgrade() -> None:
    for table in ("tenants", "api_keys"):
        op.drop_index(f"ix_{table}_changed_at", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("changed_at")
