"""Stored responses (OpenAI Responses API), encrypted at rest.

A response is begun (``in_progress``, its input items stored) and then either completed (body,
usage and output items stored, and the turn appended to its conversation, in one transaction)
or failed/cancelled (nothing appended). ``store: false`` responses only live until then.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from sqlalchemy import Integer, delete, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from skyfleet.clock import Clock, SystemClock
from skyfleet.crypto.keyring import TenantKeyring
from skyfleet.errors import ConflictError, InvalidRequestError
from skyfleet.state.access import Database, SessionSource, wall_time
from skyfleet.state.models import (
    RESPONSE_ID_PREFIX,
    Conversation,
    ConversationItem,
    ResponseItem,
    StoredResponse,
    new_id,
)
from skyfleet.state.vault import (
    KIND_RESPONSE,
    KIND_RESPONSE_ITEM,
    ItemRecord,
    Order,
    ResponseRecord,
    Sealer,
    Vault,
    append_items,
    check_page,
    dump_json,
    item_record_id,
    not_found,
    page_stmt,
    prepare_items,
    valid_id,
)

IN_PROGRESS = "in_progress"
#: Statuses of a response whose turn happened (its items count as history).
FINISHED = ("completed", "incomplete")
MAX_CHAIN = 10_000
_DUPLICATE_ITEM = "an item with this id already exists in the conversation or response"
_NOT_IN_PROGRESS = "the response is not in progress"


def _record(row: StoredResponse, body: dict[str, Any]) -> ResponseRecord:
    return ResponseRecord(
        id=row.id,
        tenant_id=row.tenant_id,
        status=row.status,
        model=row.model,
        created_at=row.created_at,
        completed_at=row.completed_at,
        conversation_id=row.conversation_id,
        previous_response_id=row.previous_response_id,
        session_id=row.session_id,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cached_tokens=row.cached_tokens,
        body=body,
    )


def _body(body: object, param: str = "body") -> dict[str, Any]:
    """A JSON-normalised copy of an object (``body``, ``error``)."""
    if not isinstance(body, dict):
        raise InvalidRequestError(f"'{param}' must be a JSON object", param=param)
    loaded: dict[str, Any] = orjson.loads(dump_json(body, param))
    return loaded


def _count(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"'{param}' must be a non-negative integer", param=param)
    return value


def _item_rows(
    sealer: Sealer, response_id: str, items: list[dict[str, Any]], kind: str, start: int, now: Any
) -> list[dict[str, Any]]:
    return [
        {
            "response_id": response_id,
            "seq": start + i,
            "id": item["id"],
            "kind": kind,
            "tenant_id": sealer.tenant_id,
            "created_at": now,
            "item_ct": sealer.seal(KIND_RESPONSE_ITEM, item_record_id(response_id, item["id"]), item, kind),
        }
        for i, item in enumerate(items)
    ]


class ResponseRepository:
    """Responses and their input/output items, per tenant."""

    def __init__(self, source: SessionSource, keyring: TenantKeyring, clock: Clock | None = None) -> None:
        self._db = Database(source)
        self._vault = Vault(keyring)
        self._clock = clock or SystemClock()

    async def begin(
        self,
        tenant_id: str,
        *,
        model: str,
        conversation_id: str | None,
        previous_response_id: str | None,
        input_items: list[dict[str, Any]],
        body: dict[str, Any],
        store: bool,
    ) -> ResponseRecord:
        """Record a new ``in_progress`` response and its input items (not yet in the conversation).

        ``session_id`` is the conversation's id, else the previous response's session, else
        the response's own id.
        """
        if not isinstance(model, str) or not 1 <= len(model) <= 200:
            raise InvalidRequestError("'model' must be a string of 1-200 characters", param="model")
        body = _body(body)
        inputs = prepare_items(input_items, "input")
        sealer = await self._vault.sealer(tenant_id)
        response_id = new_id(RESPONSE_ID_PREFIX)
        now = wall_time(self._clock)
        row = StoredResponse(
            id=response_id,
            tenant_id=tenant_id,
            status=IN_PROGRESS,
            model=model,
            created_at=now,
            completed_at=None,
            conversation_id=conversation_id,
            previous_response_id=previous_response_id,
            session_id=response_id,
            stored=bool(store),
            input_tokens=0,
            output_tokens=0,
            cached_tokens=0,
            body_ct=sealer.seal(KIND_RESPONSE, response_id, body),
        )
        async with self._db.session(write=True, conflict=_DUPLICATE_ITEM) as session:
            if conversation_id is not None:
                await self._check_conversation(session, tenant_id, conversation_id, inputs)
                row.session_id = conversation_id
            if previous_response_id is not None:
                previous = await _stored(session, tenant_id, previous_response_id)
                if previous is None:
                    raise not_found("response", previous_response_id, param="previous_response_id")
                if conversation_id is None:
                    row.session_id = previous.session_id
            session.add(row)
            await session.flush()
            if inputs:
                await session.execute(
                    insert(ResponseItem), _item_rows(sealer, response_id, inputs, "input", 0, now)
                )
        return _record(row, body)

    async def complete(
        self,
        tenant_id: str,
        response_id: str,
        *,
        body: dict[str, Any],
        output_items: list[dict[str, Any]],
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int,
    ) -> ResponseRecord:
        """Finish the response in ONE transaction: status, body, usage, output items, and the
        turn (input then output items, contiguous) appended to its conversation.

        The status is ``body["status"]`` when that is "incomplete", else "completed".
        :class:`ConflictError` if the response is not in progress (it never completes twice).
        """
        body = _body(body)
        outputs = prepare_items(output_items, "output_items")
        usage = [
            _count(v, p)
            for v, p in (
                (input_tokens, "input_tokens"),
                (output_tokens, "output_tokens"),
                (cached_tokens, "cached_tokens"),
            )
        ]
        status = "incomplete" if body.get("status") == "incomplete" else "completed"
        row, inputs = await self._in_progress(tenant_id, response_id, with_inputs=True)
        sealer = await self._vault.sealer(tenant_id)
        now = wall_time(self._clock)
        body_ct = sealer.seal(KIND_RESPONSE, response_id, body)
        async with self._db.session(write=True, conflict=_DUPLICATE_ITEM) as session:
            if row.conversation_id is not None:  # locks the conversation row first (see append_items)
                await append_items(
                    session, sealer, row.conversation_id, inputs + outputs, response_id=response_id, now=now
                )
            values = {"status": status, "completed_at": now, "body_ct": body_ct}
            values.update(zip(("input_tokens", "output_tokens", "cached_tokens"), usage, strict=True))
            await _finish(session, tenant_id, response_id, values, keep=row.stored)
            if row.stored and outputs:
                rows = _item_rows(sealer, response_id, outputs, "output", len(inputs), now)
                await session.execute(insert(ResponseItem), rows)
        for name, value in values.items():
            setattr(row, name, value)
        return _record(row, body)

    async def fail(
        self,
        tenant_id: str,
        response_id: str,
        *,
        status: Literal["failed", "cancelled"],
        error: dict[str, Any] | None,
    ) -> None:
        """Mark an in-progress response failed or cancelled; its turn is not added anywhere."""
        if status not in ("failed", "cancelled"):
            raise InvalidRequestError("status must be 'failed' or 'cancelled'", param="status")
        row, _ = await self._in_progress(tenant_id, response_id, with_inputs=False)
        body = await self._vault.open(tenant_id, KIND_RESPONSE, response_id, row.body_ct)
        body.update(status=status, error=_body(error, "error") if error is not None else None)
        sealer = await self._vault.sealer(tenant_id)
        body_ct = sealer.seal(KIND_RESPONSE, response_id, body)
        async with self._db.session(write=True) as session:
            await _finish(
                session, tenant_id, response_id, {"status": status, "body_ct": body_ct}, keep=row.stored
            )

    async def get(self, tenant_id: str, response_id: str) -> ResponseRecord:
        async with self._db.session() as session:
            row = await _stored(session, tenant_id, response_id)
        if row is None:
            raise not_found("response", response_id)
        return _record(row, await self._vault.open(tenant_id, KIND_RESPONSE, row.id, row.body_ct))

    async def delete(self, tenant_id: str, response_id: str) -> None:
        """Delete the response and its items (conversation items it produced stay)."""
        if valid_id(response_id):
            async with self._db.session(write=True) as session:
                deleted = (
                    await session.execute(
                        delete(StoredResponse)
                        .where(StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id)
                        .returning(StoredResponse.id)
                        .execution_options(synchronize_session=False)
                    )
                ).scalar_one_or_none()
                if deleted is not None:
                    await session.execute(delete(ResponseItem).where(ResponseItem.response_id == response_id))
                    return
        raise not_found("response", response_id)

    async def input_items(
        self,
        tenant_id: str,
        response_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: Order = "desc",
    ) -> tuple[list[ItemRecord], bool]:
        """One page of the response's input items, and whether more follow."""
        check_page(limit, order)
        async with self._db.session() as session:
            row = await _stored(session, tenant_id, response_id)
            if row is None:
                raise not_found("response", response_id)
            inputs = select(ResponseItem).where(
                ResponseItem.response_id == response_id, ResponseItem.kind == "input"
            )
            after_seq = None
            if after is not None:
                found = (await session.execute(inputs.where(ResponseItem.id == after))).scalar_one_or_none()
                if found is None:
                    raise not_found("item", after, param="after")
                after_seq = found.seq
            stmt = page_stmt(inputs, ResponseItem.seq, after_seq, limit, order)
            rows = (await session.execute(stmt)).scalars().all()
        page = [await self._item(tenant_id, r, row.conversation_id) for r in rows[:limit]]
        return page, len(rows) > limit

    async def history(self, tenant_id: str, response_id: str) -> list[dict[str, Any]]:
        """The turns along the previous_response_id chain ending at ``response_id``, oldest first:
        each finished response's input items, then its output items."""
        if not valid_id(response_id):
            raise not_found("response", response_id)
        responses = StoredResponse.__table__.c
        base = select(
            responses.id, responses.previous_response_id, responses.status, literal(0, Integer).label("depth")
        ).where(responses.id == response_id, responses.tenant_id == tenant_id, responses.stored)
        chain = base.cte("chain", recursive=True)
        earlier = aliased(StoredResponse)
        chain = chain.union_all(
            select(earlier.id, earlier.previous_response_id, earlier.status, chain.c.depth + 1).where(
                earlier.id == chain.c.previous_response_id,
                earlier.tenant_id == tenant_id,
                earlier.stored,
                chain.c.depth < MAX_CHAIN,
            )
        )
        async with self._db.session() as session:
            links = (await session.execute(select(chain.c.id, chain.c.status, chain.c.depth))).all()
            if not links:
                raise not_found("response", response_id)
            depth = {link.id: link.depth for link in links if link.status in FINISHED}
            stmt = select(ResponseItem).where(ResponseItem.response_id.in_(list(depth)))
            rows = (await session.execute(stmt)).scalars().all()
        rows = sorted(rows, key=lambda r: (-depth[r.response_id], r.seq))
        return [(await self._item(tenant_id, r, None)).item for r in rows]

    # -- helpers --

    async def _item(self, tenant_id: str, row: ResponseItem, conversation_id: str | None) -> ItemRecord:
        rid = item_record_id(row.response_id, row.id)
        item = await self._vault.open(tenant_id, KIND_RESPONSE_ITEM, rid, row.item_ct)
        return ItemRecord(row.id, conversation_id, row.response_id, row.seq, row.created_at, item)

    async def _in_progress(
        self, tenant_id: str, response_id: str, *, with_inputs: bool
    ) -> tuple[StoredResponse, list[dict[str, Any]]]:
        """The tenant's in-progress response (stored or not) and, if asked, its input items."""
        if not valid_id(response_id):
            raise not_found("response", response_id)
        async with self._db.session() as session:
            stmt = select(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id
            )
            row = (await session.execute(stmt)).scalar_one_or_none()
            if row is None:
                raise not_found("response", response_id)
            if row.status != IN_PROGRESS:
                raise ConflictError(_NOT_IN_PROGRESS)
            items: list[ResponseItem] = []
            if with_inputs:
                stmt_items = (
                    select(ResponseItem)
                    .where(ResponseItem.response_id == response_id, ResponseItem.kind == "input")
                    .order_by(ResponseItem.seq)
                )
                items = list((await session.execute(stmt_items)).scalars().all())
        return row, [(await self._item(tenant_id, i, None)).item for i in items]

    async def _check_conversation(
        self, session: AsyncSession, tenant_id: str, conversation_id: str, inputs: list[dict[str, Any]]
    ) -> None:
        found = None
        if valid_id(conversation_id):
            stmt = select(Conversation.id).where(
                Conversation.id == conversation_id, Conversation.tenant_id == tenant_id
            )
            found = (await session.execute(stmt)).scalar_one_or_none()
        if found is None:
            raise not_found("conversation", conversation_id, param="conversation")
        if inputs:
            clash = select(ConversationItem.id).where(
                ConversationItem.conversation_id == conversation_id,
                ConversationItem.id.in_([i["id"] for i in inputs]),
            )
            if (await session.execute(clash.limit(1))).first() is not None:
                raise ConflictError(_DUPLICATE_ITEM)


async def _stored(session: AsyncSession, tenant_id: str, response_id: str) -> StoredResponse | None:
    if not valid_id(response_id):
        return None
    stmt = select(StoredResponse).where(
        StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id, StoredResponse.stored
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def _finish(
    session: AsyncSession, tenant_id: str, response_id: str, values: dict[str, Any], *, keep: bool
) -> None:
    """Move an in-progress response to its end state; a ``store: false`` one is deleted instead."""
    target = (
        StoredResponse.id == response_id,
        StoredResponse.tenant_id == tenant_id,
        StoredResponse.status == IN_PROGRESS,
    )
    stmt = (
        update(StoredResponse).where(*target).values(**values)
        if keep
        else delete(StoredResponse).where(*target)
    )
    done = (
        await session.execute(stmt.returning(StoredResponse.id).execution_options(synchronize_session=False))
    ).scalar_one_or_none()
    if done is None:
        raise ConflictError(_NOT_IN_PROGRESS)
    if not keep:
        await session.execute(delete(ResponseItem).where(ResponseItem.response_id == response_id))
