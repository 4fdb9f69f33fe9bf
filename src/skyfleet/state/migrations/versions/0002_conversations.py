"""Tenant data keys, conversations and stored responses (encrypted), tenant retention.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = 64


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.id"], name=f"fk_{table}_tenant_id_tenants", ondelete="RESTRICT"
    )


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.add_column("tenants", sa.Column("retention_days", sa.Integer(), nullable=True))
    op.create_table(
        "tenant_keys",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("tenant_id", "version", name="pk_tenant_keys"),
        _tenant_fk("tenant_keys"),
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(_ID), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        sa.Column("next_seq", sa.Integer(), nullable=False),
        sa.Column("metadata_ct", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        _tenant_fk("conversations"),
    )
    op.create_index("ix_conversations_tenant_id_updated_at", "conversations", ["tenant_id", "updated_at"])
    op.create_table(
        "conversation_items",
        sa.Column("conversation_id", sa.String(_ID), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("id", sa.String(_ID), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("response_id", sa.String(_ID), nullable=True),
        _time("created_at"),
        sa.Column("item_ct", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("conversation_id", "seq", name="pk_conversation_items"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_conversation_items_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        _tenant_fk("conversation_items"),
    )
    op.create_index(
        "uq_conversation_items_conversation_id_id",
        "conversation_items",
        ["conversation_id", "id"],
        unique=True,
    )
    op.create_index("ix_conversation_items_tenant_id", "conversation_items", ["tenant_id"])
    op.create_table(
        "responses",
        sa.Column("id", sa.String(_ID), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        _time("created_at"),
        _time("completed_at", nullable=True),
        sa.Column("conversation_id", sa.String(_ID), nullable=True),
        sa.Column("previous_response_id", sa.String(_ID), nullable=True),
        sa.Column("session_id", sa.String(_ID), nullable=False),
        sa.Column("stored", sa.Boolean(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("body_ct", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_responses"),
        _tenant_fk("responses"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_responses_conversation_id_conversations",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_responses_tenant_id_created_at", "responses", ["tenant_id", "created_at"])
    op.create_index("ix_responses_conversation_id", "responses", ["conversation_id"])
    op.create_table(
        "response_items",
        sa.Column("response_id", sa.String(_ID), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("id", sa.String(_ID), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        _time("created_at"),
        sa.Column("item_ct", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("response_id", "seq", name="pk_response_items"),
        sa.ForeignKeyConstraint(
            ["response_id"],
            ["responses.id"],
            name="fk_response_items_response_id_responses",
            ondelete="CASCADE",
        ),
        _tenant_fk("response_items"),
    )
    op.create_index("uq_response_items_response_id_id", "response_items", ["response_id", "id"], unique=True)
    op.create_index("ix_response_items_tenant_id", "response_items", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("response_items")
    op.drop_table("responses")
    op.drop_table("conversation_items")
    op.drop_table("conversations")
    op.drop_table("tenant_keys")
    op.drop_column("tenants", "retention_days")
