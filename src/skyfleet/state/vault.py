"""What the conversation and response repositories share: records, sealing, ids, paging.

Tenant-private values are JSON sealed with :class:`~skyfleet.crypto.DataCipher` under the
tenant's current DEK, with ``AAD = record_aad(tenant_id, kind, record_id)``:

==================  =======================  ==============================
kind                record_id                sealed value
==================  =======================  ==============================
conversation        conversation id          metadata
conversation_item   ``<conv id>/<item id>``  the item object
response            response id              the Response object (``body``)
response_item       ``<resp id>/<item id>``  the item object
==================  =======================  ==============================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from sqlalchemy import Select, insert, update
from sqlalchemy.ext.asyncio import AsyncSession

from skyfleet.crypto.cipher import DataCipher, record_aad
from skyfleet.crypto.errors import DecryptionError
from skyfleet.crypto.keyring import TenantKeyring
from skyfleet.errors import InvalidRequestError, NotFoundError
from skyfleet.state.models import ID_LENGTH, MESSAGE_ID_PREFIX, Conversation, ConversationItem, new_id

KIND_CONVERSATION = "conversation"
KIND_CONVERSATION_ITEM = "conversation_item"
KIND_RESPONSE = "response"
KIND_RESPONSE_ITEM = "response_item"
PAGE_LIMIT_MAX = 100
METADATA_MAX_PAIRS = 16
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 512

Order = Literal["asc", "desc"]
_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{ID_LENGTH}}}", re.ASCII)
_ITEM_ID_PREFIXES = {
    "message": MESSAGE_ID_PREFIX,
    "function_call": "fc_",
    "function_call_output": "fco_",
    "reasoning": "rs_",
}


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    id: str
    tenant_id: str
    created_at: datetime
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """An item of a conversation (``seq`` in the conversation) or of a response (``seq`` in it)."""

    id: str
    conversation_id: str | None
    response_id: str | None
    seq: int
    created_at: datetime
    item: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    id: str
    tenant_id: str
    status: str
    model: str
    created_at: datetime
    completed_at: datetime | None
    conversation_id: str | None
    previous_response_id: str | None
    session_id: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    body: dict[str, Any]


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def not_found(what: str, record_id: object, param: str | None = None) -> NotFoundError:
    """The one answer for unknown, foreign and deleted ids alike."""
    return NotFoundError(f"{what} '{str(record_id)[:100]}' not found", param=param)


def item_record_id(container_id: str, item_id: str) -> str:
    return f"{container_id}/{item_id}"


def dump_json(value: object, param: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        raise InvalidRequestError(f"'{param}' is not JSON-serialisable", param=param) from None


def check_metadata(metadata: object) -> dict[str, str]:
    """OpenAI's metadata rules: up to 16 string pairs, keys <= 64 and values <= 512 characters."""
    if metadata is None:
        return {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > METADATA_MAX_PAIRS
        or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and len(k) <= METADATA_KEY_MAX
            and len(v) <= METADATA_VALUE_MAX
            for k, v in metadata.items()
        )
    ):
        raise InvalidRequestError(
            f"metadata: at most {METADATA_MAX_PAIRS} string pairs, keys up to {METADATA_KEY_MAX} "
            f"and values up to {METADATA_VALUE_MAX} characters",
            param="metadata",
        )
    return dict(metadata)


def prepare_items(items: object, param: str) -> list[dict[str, Any]]:
    """Copies of ``items`` (JSON-normalised), each with an ``id`` (kept if valid, else generated)."""
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InvalidRequestError(f"'{param}' must be a list of item objects", param=param)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in items:
        copy: dict[str, Any] = orjson.loads(dump_json(item, param))
        item_id = copy.get("id")
        if not valid_id(item_id) or item_id in seen:
            item_id = new_id(_ITEM_ID_PREFIXES.get(str(copy.get("type", "message")), "item_"))
        copy["id"] = item_id
        seen.add(item_id)
        out.append(copy)
    return out


def check_page(limit: int, order: str) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_LIMIT_MAX:
        raise InvalidRequestError(f"'limit' must be an integer from 1 to {PAGE_LIMIT_MAX}", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be 'asc' or 'desc'", param="order")


class Sealer:
    """Seals values under one tenant's current DEK."""

    __slots__ = ("_dek", "_version", "tenant_id")

    def __init__(self, tenant_id: str, version: int, dek: bytes) -> None:
        self.tenant_id = tenant_id
        self._version = version
        self._dek = dek

    def seal(self, kind: str, record_id: str, value: object, param: str = "body") -> bytes:
        aad = record_aad(self.tenant_id, kind, record_id)
        return DataCipher.encrypt(self._dek, dump_json(value, param), aad, key_version=self._version)


class Vault:
    """Seals and opens tenant-private JSON through the tenant keyring."""

    def __init__(self, keyring: TenantKeyring) -> None:
        self.keyring = keyring

    async def sealer(self, tenant_id: str) -> Sealer:
        version, dek = await self.keyring.data_key(tenant_id)
        return Sealer(tenant_id, version, dek)

    async def open(self, tenant_id: str, kind: str, record_id: str, blob: bytes) -> Any:
        """The value sealed in ``blob``; :class:`DecryptionError` if it cannot be opened."""
        dek = await self.keyring.data_key_version(tenant_id, DataCipher.key_version(blob))
        plaintext = DataCipher.decrypt(dek, blob, record_aad(tenant_id, kind, record_id))
        try:
            return orjson.loads(plaintext)
        except orjson.JSONDecodeError:
            raise DecryptionError from None

    async def conversation_item(self, tenant_id: str, row: ConversationItem) -> ItemRecord:
        item = await self.open(
            tenant_id, KIND_CONVERSATION_ITEM, item_record_id(row.conversation_id, row.id), row.item_ct
        )
        return ItemRecord(row.id, row.conversation_id, row.response_id, row.seq, row.created_at, item)


async def append_items(
    session: AsyncSession,
    sealer: Sealer,
    conversation_id: str,
    items: Sequence[dict[str, Any]],
    *,
    response_id: str | None,
    now: datetime,
) -> list[ItemRecord] | None:
    """Append ``items`` to a conversation of the sealer's tenant at contiguous seq numbers.

    Allocating the seq range is one ``UPDATE ... RETURNING`` of the conversation row, which
    row-locks it until the transaction ends (PostgreSQL; SQLite's BEGIN IMMEDIATE serialises
    every writer anyway): concurrent appends to one conversation queue up, never interleave.
    None if the tenant has no such conversation.
    """
    end = (
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id, Conversation.tenant_id == sealer.tenant_id)
            .values(next_seq=Conversation.next_seq + len(items), updated_at=now)
            .returning(Conversation.next_seq)
            .execution_options(synchronize_session=False)
        )
    ).scalar_one_or_none()
    if end is None:
        return None
    start = end - len(items)
    records = [
        ItemRecord(item["id"], conversation_id, response_id, start + i, now, item)
        for i, item in enumerate(items)
    ]
    if records:
        await session.execute(
            insert(ConversationItem),
            [
                {
                    "conversation_id": conversation_id,
                    "seq": r.seq,
                    "id": r.id,
                    "tenant_id": sealer.tenant_id,
                    "response_id": response_id,
                    "created_at": now,
                    "item_ct": sealer.seal(
                        KIND_CONVERSATION_ITEM, item_record_id(conversation_id, r.id), r.item, "items"
                    ),
                }
                for r in records
            ],
        )
    return records


def page_stmt(stmt: Select[Any], seq: Any, after_seq: int | None, limit: int, order: Order) -> Select[Any]:
    """``stmt`` narrowed to the page after ``after_seq`` in ``order``, one extra row to see has_more."""
    if after_seq is not None:
        stmt = stmt.where(seq > after_seq if order == "asc" else seq < after_seq)
    return stmt.order_by(seq.asc() if order == "asc" else seq.desc()).limit(limit + 1)
