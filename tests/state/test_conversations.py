"""ConversationRepository on real SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text

from skyfleet.errors import ConflictError, InvalidRequestError, NotFoundError, SkyfleetError
from skyfleet.state import Store
from skyfleet.state.conversations import ConversationRepository


def message(text_: str, role: str = "user") -> dict[str, Any]:
    kind = "input_text" if role == "user" else "output_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text_}]}


def texts(records: list[Any]) -> list[str]:
    return [r.item["content"][0]["text"] for r in records]


async def count(store: Store, sql: str, **params: Any) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


async def test_create_and_get(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.conversations
    created = await repo.create(
        acme, metadata={"topic": "demo"}, items=[message("hi"), message("hello", "assistant")]
    )
    assert created.id.startswith("conv_") and created.tenant_id == acme
    assert created.metadata == {"topic": "demo"}
    assert await repo.get(acme, created.id) == created
    items = await repo.all_items(acme, created.id)
    assert [i.seq for i in items] == [0, 1] and texts(items) == ["hi", "hello"]
    assert all(i.id.startswith("msg_") and i.item["id"] == i.id for i in items)
    assert all(i.conversation_id == created.id and i.response_id is None for i in items)
    empty = await repo.create(acme)
    assert empty.metadata == {} and await repo.all_items(acme, empty.id) == []


async def test_item_ids_kept_when_valid(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.conversations
    conv = await repo.create(
        acme, items=[{**message("a"), "id": "msg_client1"}, {**message("b"), "id": "bad/id"}]
    )
    first, second = await repo.all_items(acme, conv.id)
    assert first.id == "msg_client1"
    assert second.id != "bad/id" and second.id.startswith("msg_")
    with pytest.raises(ConflictError):
        await repo.add_items(acme, conv.id, [{**message("again"), "id": "msg_client1"}])
    assert len(await repo.all_items(acme, conv.id)) == 2
    call = await repo.add_items(acme, conv.id, [{"type": "function_call", "name": "f", "arguments": "{}"}])
    assert call[0].id.startswith("fc_")


@pytest.mark.parametrize(
    "metadata",
    [{"k": 1}, {str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, ["not", "a", "dict"]],
)
async def test_metadata_is_validated(secure_store: Store, tenant_ids: tuple[str, str], metadata: Any) -> None:
    with pytest.raises(InvalidRequestError):
        await secure_store.conversations.create(tenant_ids[0], metadata=metadata)


async def test_items_are_validated(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    repo = secure_store.conversations
    for bad in ("text", ["text"], [{"x": object()}]):
        with pytest.raises(InvalidRequestError):
            await repo.create(tenant_ids[0], items=bad)  # type: ignore[arg-type]


async def test_update_metadata(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.conversations
    conv = await repo.create(acme, metadata={"a": "1"})
    updated = await repo.update_metadata(acme, conv.id, {"b": "2"})
    assert updated.metadata == {"b": "2"} and updated.created_at == conv.created_at
    assert (await repo.get(acme, conv.id)).metadata == {"b": "2"}
    with pytest.raises(InvalidRequestError):
        await repo.update_metadata(acme, conv.id, {"a": 1})  # type: ignore[dict-item]


async def test_delete_really_deletes(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.conversations
    conv = await repo.create(acme, items=[message("one"), message("two")])
    keep = await repo.create(acme, items=[message("stay")])
    await repo.delete(acme, conv.id)
    assert await count(secure_store, "SELECT count(*) FROM conversations WHERE id = :c", c=conv.id) == 0
    assert (
        await count(
            secure_store, "SELECT count(*) FROM conversation_items WHERE conversation_id = :c", c=conv.id
        )
        == 0
    )
    with pytest.raises(NotFoundError):
        await repo.get(acme, conv.id)
    with pytest.raises(NotFoundError):
        await repo.delete(acme, conv.id)
    assert texts(await repo.all_items(acme, keep.id)) == ["stay"]


async def test_list_items_pages(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.conversations
    conv = await repo.create(acme, items=[message(f"m{i}") for i in range(5)])
    page, more = await repo.list_items(acme, conv.id, limit=2)
    assert texts(page) == ["m0", "m1"] and more
    page, more = await repo.list_items(acme, conv.id, after=page[-1].id, limit=2)
    assert texts(page) == ["m2", "m3"] and more
    page, more = await repo.list_items(acme, conv.id, after=page[-1].id, limit=2)
    assert texts(page) == ["m4"] and not more
    page, more = await repo.list_items(acme, conv.id, order="desc", limit=3)
    assert texts(page) == ["m4", "m3", "m2"] and more
    page, more = await repo.list_items(acme, conv.id, order="desc", after=page[-1].id)
    assert texts(page) == ["m1", "m0"] and not more
    page, more = await repo.list_items(acme, conv.id)
    assert texts(page) == [f"m{i}" for i in range(5)] and not more
    with pytest.raises(NotFoundError) as caught:
        await repo.list_items(acme, conv.id, after="msg_unknown")
    assert caught.value.param == "after"
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": True}, {"order": "sideways"}):
        with pytest.raises(InvalidRequestError):
            await repo.list_items(acme, conv.id, **bad)  # type: ignore[arg-type]


async def test_add_get_delete_items(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    repo = secure_store.conversations
    conv = await repo.create(acme, items=[message("first")])
    added = await repo.add_items(acme, conv.id, [message("second"), message("third")])
    assert [a.seq for a in added] == [1, 2]
    assert await repo.add_items(acme, conv.id, []) == []
    got = await repo.get_item(acme, conv.id, added[0].id)
    assert got == added[0]
    await repo.delete_item(acme, conv.id, added[0].id)
    with pytest.raises(NotFoundError):
        await repo.get_item(acme, conv.id, added[0].id)
    with pytest.raises(NotFoundError):
        await repo.delete_item(acme, conv.id, added[0].id)
    later = await repo.add_items(acme, conv.id, [message("fourth")])
    assert later[0].seq == 3  # seq numbers are never reused
    assert texts(await repo.all_items(acme, conv.id)) == ["first", "third", "fourth"]


Call = Callable[[ConversationRepository, str, str], Awaitable[Any]]
CALLS: dict[str, Call] = {
    "get": lambda r, t, c: r.get(t, c),
    "update_metadata": lambda r, t, c: r.update_metadata(t, c, {"x": "y"}),
    "list_items": lambda r, t, c: r.list_items(t, c),
    "all_items": lambda r, t, c: r.all_items(t, c),
    "add_items": lambda r, t, c: r.add_items(t, c, [message("intruder")]),
    "get_item": lambda r, t, c: r.get_item(t, c, "msg_whatever"),
    "delete_item": lambda r, t, c: r.delete_item(t, c, "msg_whatever"),
    "delete": lambda r, t, c: r.delete(t, c),
}


async def error_of(call: Awaitable[Any]) -> SkyfleetError:
    with pytest.raises(NotFoundError) as caught:
        await call
    return caught.value


def shape(err: SkyfleetError) -> tuple[object, ...]:
    return (type(err), err.status, err.code, err.param, err.message)


@pytest.mark.parametrize("method", list(CALLS))
async def test_foreign_ids_look_exactly_like_unknown_ones(
    secure_store: Store, tenant_ids: tuple[str, str], method: str
) -> None:
    acme, globex = tenant_ids
    repo = secure_store.conversations
    call = CALLS[method]
    conv = await repo.create(acme, metadata={"owner": "acme"}, items=[message("private")])
    foreign = await error_of(call(repo, globex, conv.id))
    gone = await repo.create(acme)
    await repo.delete(acme, gone.id)
    deleted = await error_of(call(repo, acme, gone.id))
    unknown = await error_of(call(repo, acme, "conv_doesnotexist00"))
    malformed = await error_of(call(repo, acme, "conv_/../x"))
    assert foreign.message == f"conversation '{conv.id}' not found"
    assert shape(foreign)[:-1] == shape(deleted)[:-1] == shape(unknown)[:-1] == shape(malformed)[:-1]
    assert deleted.message == foreign.message.replace(conv.id, gone.id)
    assert unknown.message == foreign.message.replace(conv.id, "conv_doesnotexist00")
    # ...and the owner's data is untouched.
    assert (await repo.get(acme, conv.id)).metadata == {"owner": "acme"}
    assert texts(await repo.all_items(acme, conv.id)) == ["private"]


async def test_foreign_item_ids_look_like_unknown_ones(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    acme, globex = tenant_ids
    repo = secure_store.conversations
    mine = await repo.create(acme, items=[message("a")])
    theirs = await repo.create(globex, items=[message("b")])
    [their_item] = await repo.all_items(globex, theirs.id)
    foreign = await error_of(repo.get_item(acme, mine.id, their_item.id))
    unknown = await error_of(repo.get_item(acme, mine.id, "msg_nothere"))
    assert shape(foreign)[:-1] == shape(unknown)[:-1]
    assert foreign.message == f"item '{their_item.id}' not found"
    await error_of(repo.delete_item(acme, mine.id, their_item.id))
    assert len(await repo.all_items(globex, theirs.id)) == 1
