"""Retention sweeping, tenant retention settings and the per-tenant export."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from skyfleet.clock import ManualClock
from skyfleet.errors import InvalidRequestError, NotFoundError
from skyfleet.state import Store
from skyfleet.state.access import wall_time
from skyfleet.state.conversations import export_tenant, sweep_expired, tenant_retention
from skyfleet.state.db import make_session_factory

from .test_conversations import count, message
from .test_responses import say, turn

DAY = 86_400.0


async def test_set_retention(store: Store) -> None:
    created = await store.tenants.create("acme")
    assert created.retention_days is None
    updated = await store.tenants.set_retention("acme", 30)
    assert updated.retention_days == 30 and updated.id == created.id
    assert (await store.tenants.get("acme")).retention_days == 30
    assert [t.retention_days for t in await store.tenants.list()] == [30]
    assert (await store.tenants.set_retention("acme", None)).retention_days is None
    for bad in (0, -1, 36_501, 1.5, True, "30"):
        with pytest.raises(InvalidRequestError):
            await store.tenants.set_retention("acme", bad)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        await store.tenants.set_retention("nobody", 3)


async def test_sweep_deletes_only_expired_records_of_tenants_with_retention(
    secure_store: Store, clock: ManualClock
) -> None:
    short = (await secure_store.tenants.create("short")).id  # 1 day
    long = (await secure_store.tenants.create("long")).id  # 10 days
    forever = (await secure_store.tenants.create("forever")).id  # no retention
    await secure_store.tenants.set_retention("short", 1)
    await secure_store.tenants.set_retention("long", 10)
    old: dict[str, tuple[str, str]] = {}
    for tenant in (short, long, forever):
        conv = await secure_store.conversations.create(tenant, items=[message("old")])
        resp = await turn(secure_store, tenant, "old question")
        old[tenant] = (conv.id, resp.id)
    active = await secure_store.conversations.create(short, items=[message("started long ago")])
    clock.advance(2 * DAY)
    await secure_store.conversations.add_items(short, active.id, [message("but still in use")])
    fresh_conv = await secure_store.conversations.create(short, items=[message("new")])
    fresh_resp = await turn(secure_store, short, "new question")

    factory = make_session_factory(secure_store.engine)
    deleted = await sweep_expired(factory, now=wall_time(clock), retention=await tenant_retention(factory))

    assert deleted == 2  # short's old conversation and old response
    conv_id, resp_id = old[short]
    with pytest.raises(NotFoundError):
        await secure_store.conversations.get(short, conv_id)
    with pytest.raises(NotFoundError):
        await secure_store.responses.get(short, resp_id)
    assert (
        await count(
            secure_store, "SELECT count(*) FROM conversation_items WHERE conversation_id = :c", c=conv_id
        )
        == 0
    )
    assert (
        await count(secure_store, "SELECT count(*) FROM response_items WHERE response_id = :r", r=resp_id)
        == 0
    )
    assert len(await secure_store.conversations.all_items(short, active.id)) == 2
    await secure_store.conversations.get(short, fresh_conv.id)
    await secure_store.responses.get(short, fresh_resp.id)
    for tenant in (long, forever):
        conv_id, resp_id = old[tenant]
        await secure_store.conversations.get(tenant, conv_id)
        await secure_store.responses.get(tenant, resp_id)
    # Much later, everything of tenants with a retention goes; the others' data stays.
    clock.advance(30 * DAY)
    deleted = await sweep_expired(factory, now=wall_time(clock), retention=await tenant_retention(factory))
    assert deleted == 5  # short: 2 conversations + 1 response; long: 1 + 1
    assert await count(secure_store, "SELECT count(*) FROM conversations") == 1
    assert await count(secure_store, "SELECT count(*) FROM responses") == 1
    assert await count(secure_store, "SELECT count(*) FROM conversation_items") == 1
    assert await sweep_expired(factory, now=wall_time(clock), retention=lambda _t: timedelta(days=365)) == 0


async def test_sweep_works_in_batches(
    secure_store: Store, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skyfleet.state import retention

    monkeypatch.setattr(retention, "SWEEP_BATCH", 2)
    tenant = (await secure_store.tenants.create("acme")).id
    for n in range(5):
        await secure_store.conversations.create(tenant, items=[message(str(n))])
    clock.advance(DAY)
    factory = make_session_factory(secure_store.engine)
    assert await sweep_expired(factory, now=wall_time(clock), retention=lambda _t: timedelta(hours=1)) == 5
    assert await count(secure_store, "SELECT count(*) FROM conversation_items") == 0


async def test_sweep_needs_an_aware_now(secure_store: Store) -> None:
    from datetime import datetime

    with pytest.raises(InvalidRequestError):
        await sweep_expired(
            make_session_factory(secure_store.engine), now=datetime(2025, 1, 1), retention=lambda _t: None
        )


async def test_export_yields_decrypted_records(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, globex = tenant_ids
    conv = await secure_store.conversations.create(acme, metadata={"k": "v"}, items=[message("hello")])
    first = await turn(secure_store, acme, "q1", conversation_id=conv.id)
    second = await turn(secure_store, acme, "q2", previous=first.id)
    await turn(secure_store, acme, "ephemeral", store_it=False)
    await secure_store.conversations.create(globex, items=[message("not acme's")])
    records = [
        r async for r in export_tenant(make_session_factory(secure_store.engine), secure_store.keyring, acme)
    ]
    assert all(orjson.loads(orjson.dumps(r)) == r for r in records)  # JSON-able, one per line
    [conversation] = [r for r in records if r["object"] == "conversation"]
    assert conversation["id"] == conv.id and conversation["metadata"] == {"k": "v"}
    assert [i["content"][0]["text"] for i in conversation["items"]] == ["hello", "q1", "q1->0"]
    responses = {r["id"]: r for r in records if r["object"] == "response"}
    assert set(responses) == {first.id, second.id}
    exported = responses[second.id]
    assert exported["body"] == second.body and exported["previous_response_id"] == first.id
    assert exported["input_items"][0]["content"][0]["text"] == "q2"
    assert exported["output_items"] == [{**say("q2->0"), "id": exported["output_items"][0]["id"]}]
    assert exported["usage"] == {"input_tokens": 10, "output_tokens": 5, "cached_tokens": 2}
    assert "not acme's" not in orjson.dumps(records).decode()
