"""Helpers of the key-rotation tests: records of every sealed kind, their plaintext, their DEK versions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from skyfleet.crypto import DataCipher
from skyfleet.state import Store
from skyfleet.state.conversations import ConversationRepository, ResponseRepository
from skyfleet.state.reencrypt import SEALED_COLUMNS


def message(text: str, role: str = "user") -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}


async def populate(store: Store, tenant_id: str, tag: str, *, conversations: int = 2, items: int = 3) -> None:
    """Conversations with metadata and items, a response in a conversation, a stand-alone response."""
    for c in range(conversations):
        conv = await store.conversations.create(
            tenant_id, metadata={"tag": f"{tag}-{c}"}, items=[message(f"{tag} c{c} i{i}") for i in range(items)]
        )
        begun = await store.responses.begin(
            tenant_id, model="m", conversation_id=conv.id, previous_response_id=None,
            input_items=[message(f"{tag} q{c}")], body={"object": "response", "n": c}, store=True,
        )
        await store.responses.complete(
            tenant_id, begun.id, body={"object": "response", "status": "completed", "n": c},
            output_items=[message(f"{tag} a{c}", "assistant")], input_tokens=1, output_tokens=1, cached_tokens=0,
        )
    alone = await store.responses.begin(
        tenant_id, model="m", conversation_id=None, previous_response_id=None,
        input_items=[message(f"{tag} alone")], body={"object": "response"}, store=True,
    )
    await store.responses.complete(
        tenant_id, alone.id, body={"object": "response", "status": "completed"},
        output_items=[message(f"{tag} alone answer", "assistant")], input_tokens=1, output_tokens=1, cached_tokens=0,
    )


async def plaintexts(store: Store, conversations: ConversationRepository, responses: ResponseRepository,
                     tenant_id: str) -> dict[str, Any]:
    """Everything of the tenant, decrypted through the repositories (raises if anything does not open)."""
    from skyfleet.state.models import Conversation, StoredResponse

    async with store.engine.connect() as conn:
        conv_ids = sorted((await conn.execute(
            select(Conversation.id).where(Conversation.tenant_id == tenant_id))).scalars())
        resp_ids = sorted((await conn.execute(
            select(StoredResponse.id).where(StoredResponse.tenant_id == tenant_id))).scalars())
    out: dict[str, Any] = {}
    for cid in conv_ids:
        record = await conversations.get(tenant_id, cid)
        out[cid] = (record.metadata, [i.item for i in await conversations.all_items(tenant_id, cid)])
    for rid in resp_ids:
        record = await responses.get(tenant_id, rid)
        page, _ = await responses.input_items(tenant_id, rid, limit=100)
        out[rid] = (record.body, [i.item for i in page], await responses.history(tenant_id, rid))
    return out


async def sealed_blobs(store: Store, tenant_id: str) -> dict[tuple[str, tuple[Any, ...]], bytes]:
    """Every ciphertext of the tenant, keyed by (table, primary key)."""
    out = {}
    async with store.engine.connect() as conn:
        for col in SEALED_COLUMNS:
            keys = [getattr(col.model, k) for k in col.key]
            stmt = select(*keys, getattr(col.model, col.column)).where(col.model.tenant_id == tenant_id)  # type: ignore[attr-defined]
            for row in (await conn.execute(stmt)).all():
                out[(col.model.__tablename__, tuple(row[:-1]))] = bytes(row[-1])
    return out


async def dek_versions(store: Store, tenant_id: str) -> dict[int, int]:
    """How many of the tenant's records each DEK version sealed."""
    counts: dict[int, int] = {}
    for blob in (await sealed_blobs(store, tenant_id)).values():
        version = DataCipher.key_version(blob)
        counts[version] = counts.get(version, 0) + 1
    return counts
