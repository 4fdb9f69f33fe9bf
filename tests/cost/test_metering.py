"""Metering in-process on a real SQLite store: record -> row mapping, the batching writer (size and
interval flushes, idempotence, a store that fails and recovers, the bounded queue, shutdown), and
the replica interval / sample recorder."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from skyfleet.clock import ManualClock
from skyfleet.config import load_settings
from skyfleet.cost.intervals import ReplicaCostRecorder
from skyfleet.cost.metering import UsageWriter, usage_row
from skyfleet.cost.pricing import Pricing
from skyfleet.engines.metrics import EngineMetrics
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState
from skyfleet.gateway.context import RequestRecord
from skyfleet.state import Store
from skyfleet.state.models import ReplicaInterval, ReplicaSample, UsageRecord

WALL0 = 1_800_000_000.0



@pytest.fixture
def pricing() -> Pricing:
    s = load_settings(local={"replicas": 2}, static_replicas=[
        {"url": "http://gpu:8000", "model": "big", "instance_type": "g5.xlarge", "region": "us-east-1"},
        {"url": "http://api:8000", "model": "api-m", "tier": "api"}],
        cost={"api_prices": {"api-m": {"prompt_usd_per_mtok": 3, "completion_usd_per_mtok": 15}}})
    return Pricing.from_settings(s)


def rec(rid: str, *, status: str = "completed", replica: str | None = "local-0", model: str = "smollm2-135m-instruct",
        prompt: int = 100, cached: int = 0, completion: int = 50, **kw: Any) -> RequestRecord:
    return RequestRecord(request_id=rid, tenant_id="ten_a", tenant_name="acme", key_id="key_a", model=model,
                         route="chat", stream=True, status=status, http_status=200, replica_id=replica,
                         prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, ttft_s=0.0123,
                         duration_s=2.5, started_wall=WALL0, **kw)


async def rows(store: Store) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(select(UsageRecord).order_by(UsageRecord.request_id))).all())


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_usage_row(pricing: Pricing) -> None:
    r = usage_row(rec("req_1", prompt=1000, cached=400, completion=200), pricing)
    started = datetime.fromtimestamp(WALL0, UTC)
    assert r["started_at"] == started and r["ended_at"] == started + timedelta(seconds=2.5)
    assert (r["ttft_ms"], r["pool"], r["status"], r["replica_id"]) == (12, "local", "completed", "local-0")
    # local: $0.085/h at 100 weighted tokens/s; 0.25*600 + 0.025*400 + 200 = 360 weighted * 0.236111 = 85.0 -> 85
    assert r["charged_usd_micros"] == pricing.for_replica("local-0").charge_micros(1000, 400, 200) == 85
    gpu = usage_row(rec("req_2", replica="static-0", model="big"), pricing)
    assert gpu["pool"] == "static" and gpu["charged_usd_micros"] == pricing.for_replica("static-0").charge_micros(
        100, 0, 50)
    api = usage_row(rec("req_3", replica="static-1", model="api-m"), pricing)
    assert api["charged_usd_micros"] == 100 * 3 + 50 * 15
    # Never routed (no replica): the model's price; no tokens, no charge; an odd status is a failure.
    failed = usage_row(rec("req_4", replica=None, status="weird", prompt=0, completion=0), pricing)
    assert (failed["status"], failed["charged_usd_micros"], failed["pool"]) == ("failed", 0, "local")
    assert set(r) == {c.name for c in UsageRecord.__table__.columns}
    # The serving gateway's instance id joins the record to its replica's interval (None: unknown).
    assert r["owner"] is None
    assert usage_row(rec("req_5"), pricing, owner="gw-0123456789ab")["owner"] == "gw-0123456789ab"


async def test_writer_flushes_full_batches_at_once_and_the_rest_at_close(store: Store, pricing: Pricing) -> None:
    charged: list[int] = []
    w = UsageWriter(store.engine, pricing, ManualClock(), owner="gw-1", batch_size=3, flush_interval_s=60,
                    on_charge=lambda r, m: charged.append(m))
    await w.start()
    for i in range(3):
        w.on_finish(rec(f"req_{i}"))

    async def three() -> bool:
        return len(await rows(store)) == 3
    await wait_for(three)  # long before the 60 s interval
    w.on_finish(rec("req_3", status="cancelled", completion=7))
    w.on_finish(rec("req_3", status="cancelled", completion=7))  # the same request id twice: one record
    assert w.pending == 2
    await w.close()
    got = await rows(store)
    assert [(g.request_id, g.status) for g in got] == [("req_0", "completed"), ("req_1", "completed"),
                                                      ("req_2", "completed"), ("req_3", "cancelled")]
    assert w.pending == 0 and len(charged) == 5 and all(c > 0 for c in charged)
    assert {g.owner for g in got} == {"gw-1"}
    w.on_finish(rec("req_late"))  # after close: dropped and counted, never written
    assert w.dropped == 1


async def test_writer_flushes_on_its_interval(store: Store, pricing: Pricing) -> None:
    w = UsageWriter(store.engine, pricing, ManualClock(), batch_size=1000, flush_interval_s=0.05)
    await w.start()
    try:
        w.on_finish(rec("req_a"))

        async def one() -> bool:
            return len(await rows(store)) == 1
        await wait_for(one)
    finally:
        await w.close()


async def test_store_down_keeps_records_bounded_then_writes_them(store: Store, pricing: Pricing) -> None:
    errors: list[int] = []
    drops: list[int] = []
    charged: list[str] = []
    w = UsageWriter(store.engine, pricing, ManualClock(), batch_size=2, max_pending=5,
                    on_write_error=lambda: errors.append(1), on_drop=drops.append,
                    on_charge=lambda r, m: charged.append(r.request_id))
    async with store.engine.begin() as conn:  # the table is unusable: every insert fails
        await conn.execute(text("ALTER TABLE usage_records RENAME TO usage_records_away"))
    for i in range(7):
        w.on_finish(rec(f"req_{i}"))
    assert (w.pending, w.dropped, sum(drops)) == (5, 2, 2)
    assert await w.flush() is False and await w.flush() is False
    assert w.pending == 5 and len(errors) == 2
    async with store.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE usage_records_away RENAME TO usage_records"))
    assert await w.flush() is True
    assert [g.request_id for g in await rows(store)] == [f"req_{i}" for i in range(5)]
    assert sorted(charged) == [f"req_{i}" for i in range(5)]  # priced (and counted in metrics) once each


async def test_on_finish_is_cheap_and_does_no_io(pricing: Pricing, tmp_path: Path) -> None:
    # An engine on a database that does not exist: any I/O on the request path would fail or block.
    from skyfleet.state.db import make_engine

    dead = make_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    w = UsageWriter(dead, pricing, ManualClock(), batch_size=10**6, max_pending=10**6)
    record = rec("req_x")
    start = time.perf_counter()
    for _ in range(20_000):
        w.on_finish(record)
    per_call = (time.perf_counter() - start) / 20_000
    assert w.pending == 20_000 and per_call < 50e-6
    await dead.dispose()


async def test_replica_intervals_and_samples(store: Store, pricing: Pricing) -> None:
    clock = ManualClock(wall_offset=WALL0)
    registry = ReplicaRegistry()
    for rid, model, engine in (("local-0", "m", "llama"), ("local-1", "m", "llama"), ("static-0", "big", "vllm")):
        registry.add(ReplicaSpec(id=rid, base_url="http://x", model=model, engine=engine, upstream_model=model),
                     state=ReplicaState.READY)
    a = ReplicaCostRecorder(store.engine, pricing, registry, clock, owner="gw-a", heartbeat_s=15,
                            sample_interval_s=10)
    b = ReplicaCostRecorder(store.engine, pricing, registry, clock, owner="gw-b", heartbeat_s=15,
                            sample_interval_s=10)
    await a.open_all()
    await b.open_all()
    async with store.engine.connect() as conn:
        got = (await conn.execute(select(ReplicaInterval.owner, ReplicaInterval.replica_id, ReplicaInterval.tier,
                                         ReplicaInterval.usd_per_hour, ReplicaInterval.ended_at)
                                  .order_by(ReplicaInterval.owner, ReplicaInterval.replica_id))).all()
    # Each gateway's local replicas; the static replica once (shared); the API-priced one not at all.
    assert [tuple(g) for g in got] == [
        ("gw-a", "local-0", "local", 0.085, None), ("gw-a", "local-1", "local", 0.085, None),
        ("gw-b", "local-0", "local", 0.085, None), ("gw-b", "local-1", "local", 0.085, None),
        ("static", "static-0", "on-demand", 1.006, None)]
    assert a.interval_ids["static-0"] == b.interval_ids["static-0"]

    # Utilisation: local-0 busy in 1 of 2 rounds; token counters 1000 -> 1500 over the scrapes.
    metrics = EngineMetrics("llama", 1.0, 0.0, 0.25, 400.0, 600.0, None, None, None, None, None, None)
    a.on_scrape("local-0", metrics)
    registry.acquire("local-0")
    a.tick()
    registry.release("local-0")
    a.tick()
    await asyncio.sleep(0.02)
    a.on_scrape("local-0", EngineMetrics("llama", 0.0, 0.0, 0.25, 600.0, 900.0, None, None, None, None, None, None))
    samples = a.take_samples(datetime.fromtimestamp(WALL0, UTC))
    by_id = {s["replica_id"]: s for s in samples}
    assert by_id["local-0"]["busy_fraction"] == 0.5 and by_id["local-1"]["busy_fraction"] == 0.0
    assert by_id["local-0"]["tokens_per_s"] > 0 and by_id["local-0"]["owner"] == "gw-a"
    assert by_id["static-0"]["owner"] == "static"
    from skyfleet.state.usage import insert_samples
    assert await insert_samples(store.engine, samples) == 3

    clock.advance(60)
    await a.beat()
    await a.close_all()
    await b.close_all()
    async with store.engine.connect() as conn:
        open_after = (await conn.execute(select(ReplicaInterval.owner).where(ReplicaInterval.ended_at.is_(None)))).all()
        n_samples = (await conn.execute(select(func.count()).select_from(ReplicaSample))).scalar_one()
    assert [o[0] for o in open_after] == ["static"]  # shared: left to its heartbeat
    assert n_samples == 3
