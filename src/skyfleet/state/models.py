"""ORM models of the state store. The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TENANT_ID_PREFIX = "ten_"
KEY_ID_PREFIX = "key_"
CONVERSATION_ID_PREFIX = "conv_"
RESPONSE_ID_PREFIX = "resp_"
MESSAGE_ID_PREFIX = "msg_"
#: Public ids (conversations, responses, items): client-supplied item ids are held to this too.
ID_LENGTH = 64


def new_id(prefix: str) -> str:
    """``prefix`` + 16 lowercase base32 characters (80 random bits)."""
    return prefix + base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite stores naive UTC text (fixed-width, so it compares
    correctly). Naive datetimes are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given where an aware one is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        # A name is unique among live tenants; a deleted tenant's name may be reused.
        Index(
            "uq_tenants_name_live",
            "name",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Conversations and responses older than this many days are swept; NULL keeps them.
    retention_days: Mapped[int | None] = mapped_column(Integer())
    #: Requests and tokens per minute for the whole tenant; NULL: the configured default.
    rpm_limit: Mapped[int | None] = mapped_column(Integer())
    tpm_limit: Mapped[int | None] = mapped_column(Integer())
    #: Opted in to sharing the public (system-prompt) prefix cache with other opted-in tenants.
    share_public_prefix: Mapped[bool] = mapped_column(Boolean(), server_default=text("false"))
    #: Last change of limits or settings (gateways drop cached credentials of changed tenants).
    changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        Index("uq_api_keys_key_hash", "key_hash", unique=True),
        Index("ix_api_keys_tenant_id", "tenant_id"),
        Index("ix_api_keys_revoked_at", "revoked_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="RESTRICT"))
    name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: JSON arrays of allowed model names / client CIDRs; NULL: no restriction.
    models: Mapped[str | None] = mapped_column(Text())
    cidrs: Mapped[str | None] = mapped_column(Text())
    #: Per-key requests and tokens per minute; NULL: only the tenant's limits apply.
    rpm_limit: Mapped[int | None] = mapped_column(Integer())
    tpm_limit: Mapped[int | None] = mapped_column(Integer())
    #: Last change of role, restrictions or limits (gateways drop the cached credential).
    changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


class AuditEntry(Base):
    """One entry of the append-only, hash-chained audit log (never holds a key, token or prompt)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_id_at", "tenant_id", "at"),)

    seq: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(String(80))
    tenant_id: Mapped[str | None] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[str | None] = mapped_column(Text())
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


# Conversations and stored responses. Columns ending in ``_ct`` hold AES-GCM ciphertext (see
# skyfleet.crypto); everything else is non-private bookkeeping (ids, times, status, counts).


class TenantKey(Base):
    """A tenant's data key (DEK), wrapped by the key provider's KEK."""

    __tablename__ = "tenant_keys"

    tenant_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("tenants.id", ondelete="RESTRICT"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary())
    provider: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_tenant_id_updated_at", "tenant_id", "updated_at"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The seq number the next appended item gets (seq numbers are never reused).
    next_seq: Mapped[int] = mapped_column(Integer())
    metadata_ct: Mapped[bytes] = mapped_column(LargeBinary())


class ConversationItem(Base):
    __tablename__ = "conversation_items"
    __table_args__ = (
        Index("uq_conversation_items_conversation_id_id", "conversation_id", "id", unique=True),
        Index("ix_conversation_items_tenant_id", "tenant_id"),
    )

    conversation_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(ID_LENGTH))
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="RESTRICT"))
    #: The response that produced the item (not a foreign key: the response may be deleted).
    response_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    item_ct: Mapped[bytes] = mapped_column(LargeBinary())


class StoredResponse(Base):
    __tablename__ = "responses"
    __table_args__ = (
        Index("ix_responses_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_responses_conversation_id", "conversation_id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="RESTRICT"))
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    conversation_id: Mapped[str | None] = mapped_column(
        String(ID_LENGTH), ForeignKey("conversations.id", ondelete="SET NULL")
    )
    #: Not a foreign key: a chain survives (and stops at) a deleted predecessor.
    previous_response_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    session_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    #: False for ``store: false``: the row only lives until the response finishes.
    stored: Mapped[bool] = mapped_column(Boolean())
    input_tokens: Mapped[int] = mapped_column(Integer())
    output_tokens: Mapped[int] = mapped_column(Integer())
    cached_tokens: Mapped[int] = mapped_column(Integer())
    body_ct: Mapped[bytes] = mapped_column(LargeBinary())


class ResponseItem(Base):
    __tablename__ = "response_items"
    __table_args__ = (
        Index("uq_response_items_response_id_id", "response_id", "id", unique=True),
        Index("ix_response_items_tenant_id", "tenant_id"),
    )

    response_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(ID_LENGTH))
    #: "input" or "output".
    kind: Mapped[str] = mapped_column(String(8))
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    item_ct: Mapped[bytes] = mapped_column(LargeBinary())


# Metering and cost (migration 0004). Money is integer micro-dollars; token counts, never text.


class UsageRecord(Base):
    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_tenant_id_ended_at", "tenant_id", "ended_at"),
        Index("ix_usage_records_ended_at", "ended_at"),
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(80))
    model: Mapped[str] = mapped_column(String(200))
    route: Mapped[str] = mapped_column(String(16))
    #: The gateway instance that served it (local replica ids repeat across gateways); NULL: unknown.
    owner: Mapped[str | None] = mapped_column(String(64))
    replica_id: Mapped[str | None] = mapped_column(String(128))
    pool: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int] = mapped_column(Integer())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ttft_ms: Mapped[int | None] = mapped_column(Integer())
    prompt_tokens: Mapped[int] = mapped_column(Integer())
    cached_tokens: Mapped[int] = mapped_column(Integer())
    completion_tokens: Mapped[int] = mapped_column(Integer())
    charged_usd_micros: Mapped[int] = mapped_column(BigInteger())


class ReplicaInterval(Base):
    __tablename__ = "replica_intervals"
    __table_args__ = (
        Index("uq_replica_intervals_owner_replica_id_started_at", "owner", "replica_id", "started_at", unique=True),
        Index("ix_replica_intervals_started_at", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    replica_id: Mapped[str] = mapped_column(String(128))
    pool: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    engine: Mapped[str] = mapped_column(String(16))
    instance_type: Mapped[str | None] = mapped_column(String(64))
    region: Mapped[str | None] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16))
    usd_per_hour: Mapped[float] = mapped_column(Float())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ReplicaSample(Base):
    __tablename__ = "replica_samples"
    __table_args__ = (Index("ix_replica_samples_at", "at"),)

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64))
    running: Mapped[float | None] = mapped_column(Float())
    waiting: Mapped[float | None] = mapped_column(Float())
    kv_cache_usage: Mapped[float | None] = mapped_column(Float())
    busy_fraction: Mapped[float | None] = mapped_column(Float())
    tokens_per_s: Mapped[float | None] = mapped_column(Float())


# Budgets (migration 0005). Limits and counters in integer micro-dollars; see skyfleet.cost.budgets.


class Budget(Base):
    __tablename__ = "budgets"
    __table_args__ = (Index("uq_budgets_tenant_id_subject_period", "tenant_id", "subject", "period", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"))
    #: NULL: the whole tenant's budget.
    key_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("api_keys.id", ondelete="CASCADE"))
    #: The key id, or "tenant" (so one budget per subject and period is unique on every backend).
    subject: Mapped[str] = mapped_column(String(32))
    period: Mapped[str] = mapped_column(String(16))
    soft_limit_usd_micros: Mapped[int | None] = mapped_column(BigInteger())
    hard_limit_usd_micros: Mapped[int | None] = mapped_column(BigInteger())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BudgetCounter(Base):
    """One budget's spend and in-flight reservations in one period window."""

    __tablename__ = "budget_counters"

    budget_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    spent_usd_micros: Mapped[int] = mapped_column(BigInteger())
    reserved_usd_micros: Mapped[int] = mapped_column(BigInteger())
    #: When the soft-limit alert of this window was sent (it is sent once).
    alerted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BudgetReservation(Base):
    """A request's reservation on one counter, released at settlement or after ``expires_at``."""

    __tablename__ = "budget_reservations"
    __table_args__ = (Index("ix_budget_reservations_expires_at", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    budget_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime())
    amount_usd_micros: Mapped[int] = mapped_column(BigInteger())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


# Fleet controller (migration 0008): policy state per model, decision history. See skyfleet.state.fleet.


class FleetState(Base):
    __tablename__ = "fleet_state"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: JSON of skyfleet.fleet.policy.base.PolicyState.to_json().
    state: Mapped[str] = mapped_column(Text())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class FleetDecision(Base):
    __tablename__ = "fleet_decisions"
    __table_args__ = (Index("ix_fleet_decisions_model_at", "model", "at"), Index("ix_fleet_decisions_at", "at"))

    id: Mapped[int] = mapped_column(Integer(), primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: JSON object of numbers (or null) only: what the decision was made from.
    inputs: Mapped[str] = mapped_column(Text())
    #: JSON of skyfleet.fleet.policy.base.Decision.to_json().
    decision: Mapped[str] = mapped_column(Text())
    reason: Mapped[str] = mapped_column(Text())
