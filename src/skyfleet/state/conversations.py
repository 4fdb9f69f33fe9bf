"""Conversations (OpenAI Conversations API), encrypted at rest; re-exports the response store.

Only ids, the tenant, times and seq numbers are plaintext; metadata and items are sealed with
the tenant's data key (see :mod:`skyfleet.state.vault`). Unknown, foreign and deleted ids all
raise the same :class:`NotFoundError`. Deletes are real ``DELETE``s.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from skyfleet.clock import Clock, SystemClock
from skyfleet.crypto.keyring import TenantKeyring
from skyfleet.state.access import Database, SessionSource, wall_time
from skyfleet.state.models import CONVERSATION_ID_PREFIX, Conversation, ConversationItem, new_id
from skyfleet.state.responses import ResponseRepository
from skyfleet.state.retention import export_tenant, sweep_expired, tenant_retention
from skyfleet.state.vault import (
    KIND_CONVERSATION,
    ConversationRecord,
    ItemRecord,
    Order,
    ResponseRecord,
    Vault,
    append_items,
    check_metadata,
    check_page,
    not_found,
    page_stmt,
    prepare_items,
    valid_id,
)

__all__ = [
    "ConversationRecord",
    "ConversationRepository",
    "ItemRecord",
    "ResponseRecord",
    "ResponseRepository",
    "export_tenant",
    "sweep_expired",
    "tenant_retention",
]

_DUPLICATE_ITEM = "an item with this id already exists in the conversation"


class ConversationRepository:
    """Conversations and their items, per tenant."""

    def __init__(self, source: SessionSource, keyring: TenantKeyring, clock: Clock | None = None) -> None:
        self._db = Database(source)
        self._vault = Vault(keyring)
        self._clock = clock or SystemClock()

    async def create(
        self,
        tenant_id: str,
        *,
        metadata: dict[str, str] | None = None,
        items: list[dict[str, Any]] | None = None,
    ) -> ConversationRecord:
        """A new conversation, optionally with initial items (seq 0..n-1)."""
        meta = check_metadata(metadata)
        prepared = prepare_items(items, "items")
        sealer = await self._vault.sealer(tenant_id)
        conversation_id = new_id(CONVERSATION_ID_PREFIX)
        now = wall_time(self._clock)
        row = Conversation(
            id=conversation_id,
            tenant_id=tenant_id,
            created_at=now,
            updated_at=now,
            next_seq=0,
            metadata_ct=sealer.seal(KIND_CONVERSATION, conversation_id, meta, "metadata"),
        )
        async with self._db.session(write=True, conflict=_DUPLICATE_ITEM) as session:
            session.add(row)
            await session.flush()
            await append_items(session, sealer, conversation_id, prepared, response_id=None, now=now)
        return ConversationRecord(conversation_id, tenant_id, now, meta)

    async def get(self, tenant_id: str, conversation_id: str) -> ConversationRecord:
        if valid_id(conversation_id):
            async with self._db.session() as session:
                row = await _conversation(session, tenant_id, conversation_id)
            if row is not None:
                meta = await self._vault.open(tenant_id, KIND_CONVERSATION, row.id, row.metadata_ct)
                return ConversationRecord(row.id, row.tenant_id, row.created_at, meta)
        raise not_found("conversation", conversation_id)

    async def update_metadata(
        self, tenant_id: str, conversation_id: str, metadata: dict[str, str] | None
    ) -> ConversationRecord:
        """Replace the conversation's metadata."""
        meta = check_metadata(metadata)
        if valid_id(conversation_id):
            sealer = await self._vault.sealer(tenant_id)
            sealed = sealer.seal(KIND_CONVERSATION, conversation_id, meta, "metadata")
            async with self._db.session(write=True) as session:
                created_at = (
                    await session.execute(
                        update(Conversation)
                        .where(Conversation.id == conversation_id, Conversation.tenant_id == tenant_id)
                        .values(metadata_ct=sealed, updated_at=wall_time(self._clock))
                        .returning(Conversation.created_at)
                        .execution_options(synchronize_session=False)
                    )
                ).scalar_one_or_none()
            if created_at is not None:
                return ConversationRecord(conversation_id, tenant_id, created_at, meta)
        raise not_found("conversation", conversation_id)

    async def delete(self, tenant_id: str, conversation_id: str) -> None:
        """Delete the conversation and its items (responses that used it stay, unlinked)."""
        if valid_id(conversation_id):
            async with self._db.session(write=True) as session:
                deleted = (
                    await session.execute(
                        delete(Conversation)
                        .where(Conversation.id == conversation_id, Conversation.tenant_id == tenant_id)
                        .returning(Conversation.id)
                        .execution_options(synchronize_session=False)
                    )
                ).scalar_one_or_none()
                if deleted is not None:
                    await session.execute(
                        delete(ConversationItem)
                        .where(ConversationItem.conversation_id == conversation_id)
                        .execution_options(synchronize_session=False)
                    )
                    return
        raise not_found("conversation", conversation_id)

    async def list_items(
        self,
        tenant_id: str,
        conversation_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: Order = "asc",
    ) -> tuple[list[ItemRecord], bool]:
        """One page of items in seq ``order``, starting after item ``after``; and has_more."""
        check_page(limit, order)
        async with self._db.session() as session:
            await self._require(session, tenant_id, conversation_id)
            after_seq = None
            if after is not None:
                after_seq = await _item_seq(session, conversation_id, after) if valid_id(after) else None
                if after_seq is None:
                    raise not_found("item", after, param="after")
            stmt = select(ConversationItem).where(ConversationItem.conversation_id == conversation_id)
            rows = (
                (await session.execute(page_stmt(stmt, ConversationItem.seq, after_seq, limit, order)))
                .scalars()
                .all()
            )
        page = [await self._vault.conversation_item(tenant_id, r) for r in rows[:limit]]
        return page, len(rows) > limit

    async def all_items(self, tenant_id: str, conversation_id: str) -> list[ItemRecord]:
        """The whole conversation in seq order (to build the model's prompt)."""
        async with self._db.session() as session:
            await self._require(session, tenant_id, conversation_id)
            stmt = (
                select(ConversationItem)
                .where(ConversationItem.conversation_id == conversation_id)
                .order_by(ConversationItem.seq)
            )
            rows = (await session.execute(stmt)).scalars().all()
        return [await self._vault.conversation_item(tenant_id, r) for r in rows]

    async def add_items(
        self, tenant_id: str, conversation_id: str, items: list[dict[str, Any]]
    ) -> list[ItemRecord]:
        """Append items (contiguous seq numbers, serialised against concurrent appends)."""
        prepared = prepare_items(items, "items")
        if valid_id(conversation_id):
            sealer = await self._vault.sealer(tenant_id)
            async with self._db.session(write=True, conflict=_DUPLICATE_ITEM) as session:
                added = await append_items(
                    session, sealer, conversation_id, prepared, response_id=None, now=wall_time(self._clock)
                )
            if added is not None:
                return added
        raise not_found("conversation", conversation_id)

    async def get_item(self, tenant_id: str, conversation_id: str, item_id: str) -> ItemRecord:
        async with self._db.session() as session:
            await self._require(session, tenant_id, conversation_id)
            row = None
            if valid_id(item_id):
                row = (
                    await session.execute(
                        select(ConversationItem).where(
                            ConversationItem.conversation_id == conversation_id,
                            ConversationItem.id == item_id,
                        )
                    )
                ).scalar_one_or_none()
        if row is None:
            raise not_found("item", item_id)
        return await self._vault.conversation_item(tenant_id, row)

    async def delete_item(self, tenant_id: str, conversation_id: str, item_id: str) -> None:
        async with self._db.session(write=True) as session:
            await self._require(session, tenant_id, conversation_id)
            deleted = None
            if valid_id(item_id):
                deleted = (
                    await session.execute(
                        delete(ConversationItem)
                        .where(
                            ConversationItem.conversation_id == conversation_id,
                            ConversationItem.id == item_id,
                        )
                        .returning(ConversationItem.seq)
                        .execution_options(synchronize_session=False)
                    )
                ).scalar_one_or_none()
            if deleted is None:
                raise not_found("item", item_id)

    async def _require(self, session: AsyncSession, tenant_id: str, conversation_id: str) -> None:
        if not valid_id(conversation_id) or await _conversation(session, tenant_id, conversation_id) is None:
            raise not_found("conversation", conversation_id)


async def _conversation(session: AsyncSession, tenant_id: str, conversation_id: str) -> Conversation | None:
    stmt = select(Conversation).where(Conversation.id == conversation_id, Conversation.tenant_id == tenant_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def _item_seq(session: AsyncSession, conversation_id: str, item_id: str) -> int | None:
    stmt = select(ConversationItem.seq).where(
        ConversationItem.conversation_id == conversation_id, ConversationItem.id == item_id
    )
    return (await session.execute(stmt)).scalar_one_or_none()
