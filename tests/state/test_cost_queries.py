"""The cost read side on real SQLite and PostgreSQL: usage pages (filters, keyset paging, tenant-scoped
cursors), the window snapshot the attribution takes (overlap rules, open and stale intervals), and
sample pages that walk a window exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from skyfleet.state import Store
from skyfleet.state.cost_queries import (
    STALE_HEARTBEAT,
    CostQueries,
    UnknownCursorError,
    UsageQuery,
)
from skyfleet.state.models import ApiKey, ReplicaInterval, ReplicaSample, UsageRecord

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def usage(rid: str, *, tenant: str = "ten_a", key: str = "key_a", model: str = "m", start_s: float = 0,
          dur_s: float = 1, pool: str = "p", replica: str = "local-0", charged: int = 10, **kw: Any) -> dict[str, Any]:
    row = {"request_id": rid, "tenant_id": tenant, "key_id": key, "model": model, "route": "chat",
           "replica_id": replica, "pool": pool, "status": "completed", "http_status": 200,
           "started_at": T0 + timedelta(seconds=start_s), "ended_at": T0 + timedelta(seconds=start_s + dur_s),
           "ttft_ms": 5, "prompt_tokens": 10, "cached_tokens": 2, "completion_tokens": 3,
           "charged_usd_micros": charged}
    row.update(kw)
    return row


def interval(iid: str, *, start_s: float, end_s: float | None, heartbeat_s: float | None = None,
             owner: str = "gw1", replica: str = "local-0", pool: str = "p") -> dict[str, Any]:
    return {"id": iid, "owner": owner, "replica_id": replica, "pool": pool, "model": "m", "engine": "llamacpp",
            "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "on-demand", "usd_per_hour": 1.006,
            "started_at": T0 + timedelta(seconds=start_s),
            "ended_at": None if end_s is None else T0 + timedelta(seconds=end_s),
            "heartbeat_at": T0 + timedelta(seconds=heartbeat_s if heartbeat_s is not None else (end_s or start_s))}


async def _insert(store: Store, model: Any, rows: list[dict[str, Any]]) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(insert(model), rows)


async def test_usage_page_filters_and_pages_newest_first(store: Store) -> None:
    rows = [usage(f"req_{i:02d}", start_s=i, tenant="ten_a" if i % 2 else "ten_b", model="m1" if i < 6 else "m2")
            for i in range(10)]
    rows.append(usage("req_tie", start_s=3, model="m1"))  # ends at the same instant as req_03: the id breaks the tie
    await _insert(store, UsageRecord, rows)
    q = CostQueries(store.engine)

    seen: list[str] = []
    after = None
    while True:
        page, more = await q.usage_page(UsageQuery(limit=3, after=after))
        seen += [r.request_id for r in page]
        if not more:
            break
        after = page[-1].request_id
    assert seen == ["req_09", "req_08", "req_07", "req_06", "req_05", "req_04", "req_tie", "req_03", "req_02",
                    "req_01", "req_00"]

    page, more = await q.usage_page(UsageQuery(tenant_ids=("ten_a",), model="m1"))
    assert [r.request_id for r in page] == ["req_05", "req_tie", "req_03", "req_01"] and not more
    window = UsageQuery(since=T0 + timedelta(seconds=3), until=T0 + timedelta(seconds=6))
    assert [r.request_id for r in (await q.usage_page(window))[0]] == ["req_04", "req_tie", "req_03", "req_02"]
    assert (await q.usage_page(UsageQuery(key_id="nope")))[0] == []
    first = (await q.usage_page(UsageQuery(limit=1)))[0][0]
    assert first.json()["charged_usd"] == pytest.approx(1e-5) and first.started_at.tzinfo is not None
    assert "prompt" not in "".join(k for k in first.json() if k != "prompt_tokens")


async def test_usage_cursor_must_be_visible_to_the_tenant(store: Store) -> None:
    await _insert(store, UsageRecord, [usage("req_a", tenant="ten_a"), usage("req_b", tenant="ten_b")])
    q = CostQueries(store.engine)
    with pytest.raises(UnknownCursorError):
        await q.usage_page(UsageQuery(tenant_ids=("ten_a",), after="req_b"))  # another tenant's id: not a cursor
    with pytest.raises(UnknownCursorError):
        await q.usage_page(UsageQuery(after="req_missing"))
    assert (await q.usage_page(UsageQuery(tenant_ids=("ten_b",), after="req_b"))) == ([], False)


async def test_window_takes_what_overlaps(store: Store) -> None:
    start, end = T0 + timedelta(seconds=100), T0 + timedelta(seconds=200)
    now = T0 + timedelta(seconds=1000)
    await _insert(store, ReplicaInterval, [
        interval("i_before", start_s=0, end_s=100),          # ended exactly at start: out
        interval("i_span", start_s=0, end_s=150, replica="r1"),
        interval("i_after", start_s=200, end_s=300, replica="r2"),  # starts at end: out
        interval("i_open", start_s=150, end_s=None, heartbeat_s=990, replica="r3"),  # fresh heartbeat: running
        interval("i_dead", start_s=10, end_s=None, heartbeat_s=90, replica="r4"),    # died before the window
        interval("i_died_in", start_s=10, end_s=None, heartbeat_s=120, replica="r5"),  # died inside it
    ])
    await _insert(store, UsageRecord, [
        usage("u_before", start_s=50, dur_s=49),     # ended before start: out
        usage("u_edge", start_s=90, dur_s=10),       # ends exactly at start: in (zero overlap is the attribution's call)
        usage("u_in", start_s=120, dur_s=5),
        usage("u_late", start_s=199, dur_s=50),      # straddles the end: in
        usage("u_after", start_s=200, dur_s=1),      # starts at end: out
    ])
    w = await CostQueries(store.engine).window(start, end, now)
    assert [i.id for i in w.intervals] == ["i_span", "i_died_in", "i_open"]
    by_id = {i.id: i for i in w.intervals}
    assert by_id["i_open"].end_at(now) == now
    assert by_id["i_died_in"].end_at(now) == T0 + timedelta(seconds=120)
    assert by_id["i_span"].end_at(now) == T0 + timedelta(seconds=150)
    assert [u.request_id for u in w.usage] == ["u_edge", "u_in", "u_late"]
    assert (w.start, w.end, w.now) == (start, end, now)


def test_end_at_of_open_intervals() -> None:
    from skyfleet.state.cost_queries import IntervalRow

    row = IntervalRow("i", "gw", "r", "p", "m", "llamacpp", None, None, "local", 0.5, T0, None, T0)
    assert row.end_at(T0 + STALE_HEARTBEAT) == T0 + STALE_HEARTBEAT
    assert row.end_at(T0 + STALE_HEARTBEAT + timedelta(seconds=1)) == T0
    assert row.end_at(T0 - timedelta(seconds=5)) == T0  # a clock behind the start never yields a negative span


async def test_sample_pages_walk_each_sample_once(store: Store) -> None:
    rows = [{"owner": owner, "replica_id": rep, "at": T0 + timedelta(seconds=s), "pool": "p", "running": 1.0,
             "waiting": 0.0, "kv_cache_usage": 0.1, "busy_fraction": 0.5, "tokens_per_s": 10.0}
            for s in range(0, 20) for owner in ("gw1", "gw2") for rep in ("local-0", "local-1")]
    await _insert(store, ReplicaSample, rows)
    q = CostQueries(store.engine)
    pages = [p async for p in q.sample_pages(T0 + timedelta(seconds=5), T0 + timedelta(seconds=15), page_size=7)]
    got = [(s.at, s.owner, s.replica_id) for p in pages for s in p]
    assert len(got) == 40 and len(set(got)) == 40 and got == sorted(got)
    assert min(got)[0] == T0 + timedelta(seconds=5) and max(got)[0] == T0 + timedelta(seconds=14)
    assert [len(p) for p in pages] == [7, 7, 7, 7, 7, 5]
    assert [p async for p in q.sample_pages(T0 + timedelta(days=1), T0 + timedelta(days=2))] == []


async def test_names(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    await _insert(store, ApiKey, [{"id": "key_x", "tenant_id": tenant.id, "name": "ci", "role": "member",
                                   "prefix": "sk-sf-x", "key_hash": "0" * 64, "created_at": T0}])
    q = CostQueries(store.engine)
    assert await q.tenant_ids("acme") == (tenant.id,)
    assert await q.tenant_ids("nobody") == ()
    assert await q.tenant_names([tenant.id, "ten_gone"]) == {tenant.id: "acme"}
    assert await q.key_names(["key_x", "key_y"]) == {"key_x": "ci"}
    assert await q.tenant_names([]) == {} and await q.key_names([]) == {}


async def test_served_by_joins_on_the_owner_and_guesses_only_without_one(store: Store) -> None:
    await _insert(store, ReplicaInterval, [
        interval("i_gw1", start_s=0, end_s=100, owner="gw1"),
        interval("i_gw2_old", start_s=0, end_s=8, owner="gw2"),  # the same replica at an earlier price
        interval("i_gw2", start_s=8, end_s=100, owner="gw2"),
        interval("i_static", start_s=0, end_s=100, owner="static", replica="ext-0"),
    ])
    await _insert(store, UsageRecord, [
        usage("u_gw2", start_s=10, owner="gw2"),
        usage("u_gw1", start_s=10, owner="gw1"),
        usage("u_static", start_s=10, owner="gw1", replica="ext-0"),  # any gateway: the shared interval
        usage("u_nobody", start_s=10, owner="gw9"),  # a gateway that recorded no interval: not guessed
        usage("u_legacy", start_s=10, owner=None),  # before migration 0007: the earliest local-0 running then
        usage("u_no_replica", start_s=10, owner="gw1", replica=None),
    ])
    q = CostQueries(store.engine)
    w = await q.window(T0, T0 + timedelta(seconds=100), T0 + timedelta(seconds=100))
    served = {rid: iv.id if iv is not None else None for rid, iv in w.served_by().items()}
    assert served == {"u_gw2": "i_gw2", "u_gw1": "i_gw1", "u_static": "i_static", "u_nobody": None,
                      "u_legacy": "i_gw1", "u_no_replica": None}
    page, _ = await q.usage_page(UsageQuery())
    assert {r.request_id: r.json()["owner"] for r in page}["u_gw2"] == "gw2"
    assert {r.request_id: r.owner for r in page}["u_legacy"] is None
