"""Retention sweeping and per-tenant export of conversations and stored responses."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from skyfleet.crypto.keyring import TenantKeyring
from skyfleet.errors import InvalidRequestError
from skyfleet.state.access import Database, SessionSource
from skyfleet.state.models import Conversation, ConversationItem, ResponseItem, StoredResponse, Tenant
from skyfleet.state.vault import KIND_CONVERSATION, KIND_RESPONSE, KIND_RESPONSE_ITEM, Vault, item_record_id

SWEEP_BATCH = 500
EXPORT_BATCH = 100

Retention = Callable[[str], timedelta | None]


async def tenant_retention(session_factory: SessionSource) -> Retention:
    """A ``retention`` for :func:`sweep_expired` from the tenants' ``retention_days`` (NULL: keep)."""
    async with Database(session_factory).session() as session:
        rows = (await session.execute(select(Tenant.id, Tenant.retention_days))).all()
    days = {tenant_id: d for tenant_id, d in rows if d is not None}

    def retention(tenant_id: str) -> timedelta | None:
        found = days.get(tenant_id)
        return None if found is None else timedelta(days=found)

    return retention


async def sweep_expired(session_factory: SessionSource, *, now: datetime, retention: Retention) -> int:
    """Delete the conversations and responses that outlived their tenant's retention.

    ``retention(tenant_id)`` is how long to keep a tenant's data (None: forever). A
    conversation expires when its last activity (``updated_at``: creation, appends, metadata
    updates) is older than that; a response when its ``created_at`` is. Items go with them.
    Deletes run in batches of :data:`SWEEP_BATCH`, one transaction each. Returns how many
    conversations and responses were deleted.
    """
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise InvalidRequestError("'now' must be a timezone-aware datetime", param="now")
    db = Database(session_factory)
    async with db.session() as session:
        tenant_ids = list((await session.execute(select(Tenant.id).order_by(Tenant.id))).scalars())
    deleted = 0
    for tenant_id in tenant_ids:
        keep = retention(tenant_id)
        if keep is None:
            continue
        cutoff = now.astimezone(UTC) - keep
        deleted += await _sweep(
            db, Conversation, Conversation.updated_at < cutoff, tenant_id, ConversationItem.conversation_id
        )
        deleted += await _sweep(
            db, StoredResponse, StoredResponse.created_at < cutoff, tenant_id, ResponseItem.response_id
        )
    return deleted


async def _sweep(db: Database, model: Any, expired: Any, tenant_id: str, child_fk: Any) -> int:
    deleted = 0
    while True:
        async with db.session(write=True) as session:
            batch = select(model.id).where(model.tenant_id == tenant_id, expired).limit(SWEEP_BATCH)
            ids = list((await session.execute(batch)).scalars())
            if not ids:
                break
            # The condition is repeated: a row touched since the SELECT is no longer expired.
            gone = list(
                (
                    await session.execute(
                        delete(model)
                        .where(model.id.in_(ids), model.tenant_id == tenant_id, expired)
                        .returning(model.id)
                        .execution_options(synchronize_session=False)
                    )
                ).scalars()
            )
            if gone:
                await session.execute(delete(child_fk.table).where(child_fk.in_(gone)))
        deleted += len(gone)
        if len(ids) < SWEEP_BATCH:
            break
    return deleted


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


async def export_tenant(
    session_factory: SessionSource, keyring: TenantKeyring, tenant_id: str
) -> AsyncIterator[dict[str, Any]]:
    """The tenant's conversations (with their items) then its stored responses, decrypted: one
    JSON-able dict per record, for ``skyfleet sessions export``. Raises :class:`DecryptionError`
    (fails closed) if any record cannot be decrypted, e.g. after the tenant was shredded."""
    db = Database(session_factory)
    vault = Vault(keyring)
    after = ""
    while True:
        async with db.session() as session:
            stmt = (
                select(Conversation)
                .where(Conversation.tenant_id == tenant_id, Conversation.id > after)
                .order_by(Conversation.id)
                .limit(EXPORT_BATCH)
            )
            conversations = list((await session.execute(stmt)).scalars())
            item_stmt = (
                select(ConversationItem)
                .where(ConversationItem.conversation_id.in_([c.id for c in conversations]))
                .order_by(ConversationItem.conversation_id, ConversationItem.seq)
            )
            items = list((await session.execute(item_stmt)).scalars()) if conversations else []
        by_conversation: dict[str, list[ConversationItem]] = defaultdict(list)
        for item in items:
            by_conversation[item.conversation_id].append(item)
        for conv in conversations:
            yield {
                "object": "conversation",
                "id": conv.id,
                "created_at": _iso(conv.created_at),
                "updated_at": _iso(conv.updated_at),
                "metadata": await vault.open(tenant_id, KIND_CONVERSATION, conv.id, conv.metadata_ct),
                "items": [
                    (await vault.conversation_item(tenant_id, i)).item for i in by_conversation[conv.id]
                ],
            }
        if len(conversations) < EXPORT_BATCH:
            break
        after = conversations[-1].id
    after = ""
    while True:
        async with db.session() as session:
            stmt = (
                select(StoredResponse)
                .where(
                    StoredResponse.tenant_id == tenant_id, StoredResponse.stored, StoredResponse.id > after
                )
                .order_by(StoredResponse.id)
                .limit(EXPORT_BATCH)
            )
            responses = list((await session.execute(stmt)).scalars())
            item_stmt = (
                select(ResponseItem)
                .where(ResponseItem.response_id.in_([r.id for r in responses]))
                .order_by(ResponseItem.response_id, ResponseItem.seq)
            )
            items_r = list((await session.execute(item_stmt)).scalars()) if responses else []
        by_response: dict[str, list[ResponseItem]] = defaultdict(list)
        for item in items_r:
            by_response[item.response_id].append(item)
        for resp in responses:
            opened = [
                (
                    i.kind,
                    await vault.open(tenant_id, KIND_RESPONSE_ITEM, item_record_id(resp.id, i.id), i.item_ct),
                )
                for i in by_response[resp.id]
            ]
            yield {
                "object": "response",
                "id": resp.id,
                "status": resp.status,
                "model": resp.model,
                "created_at": _iso(resp.created_at),
                "completed_at": _iso(resp.completed_at),
                "conversation_id": resp.conversation_id,
                "previous_response_id": resp.previous_response_id,
                "session_id": resp.session_id,
                "usage": {
                    "input_tokens": resp.input_tokens,
                    "output_tokens": resp.output_tokens,
                    "cached_tokens": resp.cached_tokens,
                },
                "body": await vault.open(tenant_id, KIND_RESPONSE, resp.id, resp.body_ct),
                "input_items": [item for kind, item in opened if kind == "input"],
                "output_items": [item for kind, item in opened if kind == "output"],
            }
        if len(responses) < EXPORT_BATCH:
            break
        after = responses[-1].id
