"""The metering's writes on real SQLite and PostgreSQL: idempotent usage inserts, replica intervals
(open, heartbeat, close, stale ones closed at their last heartbeat, a static replica shared by
gateways counted once) and samples."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from skyfleet.state import Store
from skyfleet.state import usage as u
from skyfleet.state.models import ReplicaInterval, ReplicaSample, UsageRecord

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def row(rid: str, **kw: Any) -> dict[str, Any]:
    base = {"request_id": rid, "tenant_id": "ten_a", "key_id": "key_a", "model": "m", "route": "chat",
            "replica_id": "local-0", "pool": "local", "status": "completed", "http_status": 200,
            "started_at": T0, "ended_at": T0 + timedelta(seconds=1), "ttft_ms": 12, "prompt_tokens": 10,
            "cached_tokens": 0, "completion_tokens": 5, "charged_usd_micros": 7}
    return {**base, **kw}


async def count(store: Store, model: Any) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


async def test_usage_inserts_are_idempotent_per_request_id(store: Store) -> None:
    assert await u.insert_usage(store.engine, [row("r1"), row("r2"), row("r1", completion_tokens=99)]) == 2
    # A retried batch (the first attempt's outcome unknown) adds only what is new; the first row wins.
    assert await u.insert_usage(store.engine, [row("r2", charged_usd_micros=1000), row("r3")]) == 1
    assert await count(store, UsageRecord) == 3
    async with store.engine.connect() as conn:
        got = (await conn.execute(select(UsageRecord.completion_tokens, UsageRecord.charged_usd_micros)
                                  .where(UsageRecord.request_id.in_(["r1", "r2"]))
                                  .order_by(UsageRecord.request_id))).all()
    assert [tuple(g) for g in got] == [(99, 7), (5, 7)]  # in-batch duplicate: the last one; stored r2 kept


async def test_large_batches_are_split_into_statements(store: Store) -> None:
    rows = [row(f"r{i:05d}") for i in range(2500)]
    assert await u.insert_usage(store.engine, rows) == 2500
    assert await u.insert_usage(store.engine, rows) == 0
    assert await count(store, UsageRecord) == 2500


def spec(owner: str, replica: str = "local-0", usd: float = 0.085, tier: str = "local") -> u.IntervalSpec:
    return u.IntervalSpec(owner=owner, replica_id=replica, pool="local", model="m", engine="llama",
                          instance_type=None, region=None, tier=tier, usd_per_hour=usd)


async def intervals(store: Store) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(select(ReplicaInterval).order_by(ReplicaInterval.id))).all())


async def test_interval_lifecycle_and_stale_intervals(store: Store) -> None:
    await u.open_interval(store.engine, "ri_a", spec("gw1"), T0)
    await u.open_interval(store.engine, "ri_a", spec("gw1"), T0)  # idempotent
    await u.open_interval(store.engine, "ri_b", spec("gw2"), T0)  # same replica id, another gateway
    assert await u.heartbeat(store.engine, ["ri_a", "ri_b", "ri_gone"], T0 + timedelta(seconds=15)) == {"ri_a", "ri_b"}
    await u.close_intervals(store.engine, ["ri_a"], T0 + timedelta(seconds=20))
    await u.close_intervals(store.engine, ["ri_a"], T0 + timedelta(seconds=99))  # closed stays closed
    assert await u.heartbeat(store.engine, ["ri_a"], T0 + timedelta(seconds=30)) == set()
    # gw2 died: its interval ends at its last heartbeat when a later gateway sweeps.
    assert await u.close_stale_intervals(store.engine, heartbeat_before=T0 + timedelta(minutes=5)) == 1
    got = {r.id: (r.ended_at, r.heartbeat_at) for r in await intervals(store)}
    assert got == {"ri_a": (T0 + timedelta(seconds=20), T0 + timedelta(seconds=20)),
                   "ri_b": (T0 + timedelta(seconds=15), T0 + timedelta(seconds=15))}


async def test_a_static_replica_listed_by_several_gateways_has_one_interval(store: Store) -> None:
    s = spec(u.STATIC_OWNER, "static-0", usd=1.006, tier="on-demand")
    fresh = T0 - timedelta(minutes=5)
    # Ten gateways start together (different start instants and ids): they converge on one interval.
    kept = await asyncio.gather(*(u.adopt_static_interval(store.engine, f"ri_{i}", s, T0 + timedelta(milliseconds=i),
                                                          fresh) for i in range(10)))
    rows = await intervals(store)
    assert len(rows) >= 1
    # Whoever still holds a deleted id finds out at its next heartbeat and adopts again.
    alive = await u.heartbeat(store.engine, set(kept), T0 + timedelta(seconds=15))
    again = [k if k in alive else await u.adopt_static_interval(store.engine, "ri_new", s, T0, fresh) for k in kept]
    rows = await intervals(store)
    assert len(rows) == 1 and set(again) == {rows[0].id} and rows[0].started_at == T0
    # Another price is another interval.
    other = await u.adopt_static_interval(store.engine, "ri_p", spec(u.STATIC_OWNER, "static-0", usd=0.4, tier="spot"),
                                          T0 + timedelta(seconds=1), fresh)
    assert other == "ri_p" and len(await intervals(store)) == 2


async def test_samples_insert_once(store: Store) -> None:
    sample = {"owner": "gw1", "replica_id": "local-0", "at": T0, "pool": "local", "running": 1.0, "waiting": 0.0,
              "kv_cache_usage": 0.2, "busy_fraction": 0.5, "tokens_per_s": 80.0}
    assert await u.insert_samples(store.engine, [sample, {**sample, "at": T0 + timedelta(seconds=10)}]) == 2
    assert await u.insert_samples(store.engine, [sample]) == 0
    assert await count(store, ReplicaSample) == 2
