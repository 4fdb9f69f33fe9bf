"""Budget counters on real backends (SQLite, PostgreSQL, Redis) and the budget definitions.

Every backend: reserve all-or-none, settle releases a reservation once, expired reservations are
released (a crashed gateway's), one soft-limit alert per period across two gateways, concurrent
reservations from two gateways never pass a hard limit, and the same results as the in-process
reference model on random operation sequences.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfleet.cost.budget_store_redis import RedisBudgetCounters
from skyfleet.cost.budget_store_sql import BudgetRepository, SqlBudgetCounters
from skyfleet.cost.budgets import (
    BudgetBackend,
    BudgetUnavailableError,
    CounterRef,
    CounterState,
    MemoryBudgetCounters,
    ReserveLine,
    SettleLine,
    Settlement,
    period_window,
)
from skyfleet.errors import ConflictError, InvalidRequestError, NotFoundError
from skyfleet.state import Store
from tests.state.conftest import sqlite_url

REDIS_URL = os.environ.get("SKYFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NOW = datetime(2025, 5, 17, 12, 0, tzinfo=UTC)
START = period_window("daily", NOW)[0]
TTL = timedelta(minutes=15)


@dataclass
class Env:
    """Two 'gateways' (backends) over one shared counter store, and the budgets they count."""

    kind: str
    a: BudgetBackend
    b: BudgetBackend
    repo: BudgetRepository | None
    counters: list[CounterRef]
    set_hard: Callable[[int, int | None], Any]


async def _redis_prefix() -> str:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({type(exc).__name__}); start it (see .ci/run)")
    finally:
        await client.aclose()
    return "skyfleet-test-budget-" + secrets.token_hex(4)


async def _drop_prefix(prefix: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def kind_url(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, str]:
    """(backend, database URL): Redis counters keep their definitions in SQLite."""
    if request.param == "postgresql":
        return request.param, request.getfixturevalue("pg_url")
    return request.param, sqlite_url(tmp_path / "state.db")


@pytest.fixture
async def env(kind_url: tuple[str, str]) -> AsyncIterator[Env]:
    kind, url = kind_url
    store = await Store.open(url)
    other = await Store.open(url)
    tenant = await store.tenants.create("acme")
    _, key = await store.keys.create("acme", role="member")
    repo = BudgetRepository(store.engine)
    defs = [await repo.create(tenant_id=tenant.id, key_id=None, period="daily", soft_limit_usd_micros=None,
                              hard_limit_usd_micros=1000),
            await repo.create(tenant_id=tenant.id, key_id=key.id, period="daily", soft_limit_usd_micros=None,
                              hard_limit_usd_micros=1000),
            await repo.create(tenant_id=tenant.id, key_id=None, period="total", soft_limit_usd_micros=None,
                              hard_limit_usd_micros=1000)]
    counters = [CounterRef(d.id, tenant.id, START if d.period == "daily" else period_window("total", NOW)[0])
                for d in defs]

    async def set_hard(i: int, hard: int | None) -> None:
        await repo.update(defs[i].id, {"hard_limit_usd_micros": hard, "soft_limit_usd_micros": 0 if hard is None
                                       else None})

    prefix = ""
    if kind == "redis":
        prefix = await _redis_prefix()
        a: BudgetBackend = RedisBudgetCounters(REDIS_URL, prefix=prefix, timeout_s=2, ttl_s=TTL.total_seconds())
        b: BudgetBackend = RedisBudgetCounters(REDIS_URL, prefix=prefix, timeout_s=2, ttl_s=TTL.total_seconds())
    else:
        a, b = SqlBudgetCounters(store.engine), SqlBudgetCounters(other.engine)
    try:
        yield Env(kind, a, b, repo, counters, set_hard)
    finally:
        await a.close()
        await b.close()
        await store.close()
        await other.close()
        if prefix:
            await _drop_prefix(prefix)


def lines(env: Env, amount: int, *idx: int, hard: int | None = 1000) -> list[ReserveLine]:
    return [ReserveLine(env.counters[i], amount, hard, None) for i in idx]


def settle(env: Env, rid: str, actual: int, *idx: int, soft: int | None = None) -> Settlement:
    return Settlement(rid, tuple(SettleLine(env.counters[i], soft) for i in idx), actual)


async def states(env: Env, backend: BudgetBackend | None = None) -> list[tuple[int, int]]:
    found = await (backend or env.a).state(env.counters, now=NOW)
    return [(found.get(c, CounterState(0, 0)).spent, found.get(c, CounterState(0, 0)).reserved) for c in env.counters]


async def test_reserve_is_all_or_none_and_settle_releases_once(env: Env) -> None:
    assert await env.a.reserve(lines(env, 600, 0, 1), "r1", now=NOW, expires_at=NOW + TTL) is None
    assert await states(env) == [(0, 600), (0, 600), (0, 0)]
    # The total budget has room, the tenant's daily one does not: nothing is reserved anywhere.
    assert await env.b.reserve(lines(env, 500, 2, 0), "r2", now=NOW, expires_at=NOW + TTL) == 1
    assert await states(env, env.b) == [(0, 600), (0, 600), (0, 0)]
    crossings = await env.b.settle([settle(env, "r1", 450, 0, 1)], now=NOW)
    assert crossings == [] and await states(env) == [(450, 0), (450, 0), (0, 0)]
    await env.a.settle([settle(env, "r1", 0, 0, 1), settle(env, "r1", 0, 0, 1)], now=NOW)  # released once only
    assert await states(env) == [(450, 0), (450, 0), (0, 0)]
    assert await env.a.reserve(lines(env, 550, 0), "r3", now=NOW, expires_at=NOW + TTL) is None  # exactly full
    assert await env.a.reserve(lines(env, 1, 0), "r4", now=NOW, expires_at=NOW + TTL) == 0
    # Without a limit of its own the line passes on Redis; SQL always applies the stored limit.
    refused = await env.a.reserve(lines(env, 1, 0, hard=None), "r5", now=NOW, expires_at=NOW + TTL)
    assert refused == (None if env.kind == "redis" else 0)


async def test_expired_reservations_are_released_never_twice(env: Env) -> None:
    if env.kind == "redis":  # expiry on Redis' own clock: a backend with a short TTL
        short = RedisBudgetCounters(REDIS_URL, prefix=env.a._prefix, timeout_s=2, ttl_s=0.2)  # type: ignore[attr-defined]
        try:
            assert await short.reserve(lines(env, 700, 0), "crashed", now=NOW, expires_at=NOW) is None
            assert (await states(env))[0] == (0, 700)
            deadline = time.monotonic() + 10
            while (await states(env))[0] != (0, 0):  # reading releases the expired ones
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await short.close()
    else:
        assert await env.a.reserve(lines(env, 700, 0), "crashed", now=NOW, expires_at=NOW + TTL) is None
        assert await env.b.release_expired(now=NOW + TTL / 2) == 0
        assert await env.b.release_expired(now=NOW + TTL * 2) == 1
        assert await env.a.release_expired(now=NOW + TTL * 2) == 0
        assert (await states(env))[0] == (0, 0)
    # The late settlement still counts the spend but releases nothing twice.
    await env.a.settle([settle(env, "crashed", 300, 0)], now=NOW)
    assert (await states(env))[0] == (300, 0)


async def test_one_soft_limit_alert_per_period_across_two_gateways(env: Env) -> None:
    await env.repo.update(env.counters[0].budget_id, {"soft_limit_usd_micros": 100})  # type: ignore[union-attr]
    for i in range(20):
        assert await (env.a if i % 2 else env.b).reserve(lines(env, 20, 0), f"r{i}", now=NOW,
                                                         expires_at=NOW + TTL) is None
    results = await asyncio.gather(*((env.a if i % 2 else env.b).settle([settle(env, f"r{i}", 10, 0, soft=100)],
                                                                          now=NOW) for i in range(20)))
    crossings = [c for r in results for c in r]
    assert len(crossings) == 1 and crossings[0].spent >= 100 and crossings[0].soft_limit == 100
    assert (await states(env))[0] == (200, 0)


async def test_concurrent_reservations_from_two_gateways_never_pass_the_hard_limit(env: Env) -> None:
    results = await asyncio.gather(*((env.a if i % 2 else env.b).reserve(
        lines(env, 30, 0, 1), f"c{i}", now=NOW, expires_at=NOW + TTL) for i in range(60)))
    assert sum(r is None for r in results) == 1000 // 30
    assert await states(env) == [(0, 990), (0, 990), (0, 0)]


async def test_a_limit_lowered_below_spend_refuses_the_next_reservation(env: Env) -> None:
    assert await env.a.reserve(lines(env, 400, 0), "r1", now=NOW, expires_at=NOW + TTL) is None
    await env.a.settle([settle(env, "r1", 400, 0)], now=NOW)
    await env.set_hard(0, 300)
    # SQL reads the limit in the reserving statement; Redis takes the caller's (refreshed) one.
    assert await env.b.reserve(lines(env, 1, 0, hard=300), "r2", now=NOW, expires_at=NOW + TTL) == 0
    if env.kind != "redis":  # even with a stale limit from a gateway's cache
        assert await env.b.reserve(lines(env, 1, 0, hard=1000), "r3", now=NOW, expires_at=NOW + TTL) == 0
    await env.set_hard(0, None)
    assert await env.b.reserve(lines(env, 10**6, 0, hard=None), "r4", now=NOW, expires_at=NOW + TTL) is None


async def test_deleting_a_budget_drops_its_counters(env: Env) -> None:
    assert await env.a.reserve(lines(env, 100, 0, 1), "r1", now=NOW, expires_at=NOW + TTL) is None
    assert env.repo is not None
    gone = await env.repo.delete(env.counters[0].budget_id)
    await env.a.forget(gone)
    assert await states(env) == [(0, 0), (0, 100), (0, 0)]
    await env.a.settle([settle(env, "r1", 50, 0, 1)], now=NOW)  # the deleted one is skipped
    assert await states(env) == [(0, 0), (50, 0), (0, 0)]


# -- equal to the reference model -------------------------------------------------------------------

op = st.one_of(
    st.tuples(st.just("reserve"), st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True),
              st.integers(0, 400)),
    st.tuples(st.just("settle"), st.integers(0, 9), st.integers(0, 400)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(op, min_size=1, max_size=12))
async def test_the_backend_agrees_with_the_reference_model(env: Env, ops: list[tuple[Any, ...]]) -> None:
    run = secrets.token_hex(3)
    ref = MemoryBudgetCounters()
    for c in env.counters:  # start from the backend's current state (examples share the fixture)
        st_ = (await env.a.state([c], now=NOW)).get(c, CounterState(0, 0))
        ref.counters[c] = [st_.spent, st_.reserved, 1]
    made: list[tuple[str, list[int]]] = []
    for kind, *args in ops:
        if kind == "reserve":
            idx, amount = args
            rid = f"{run}-{len(made)}"
            ls = [ReserveLine(env.counters[i], amount, 1000, None) for i in idx]
            got = await env.a.reserve(ls, rid, now=NOW, expires_at=NOW + TTL)
            want = await ref.reserve(ls, rid, now=NOW, expires_at=NOW + TTL)
            assert (got is None) == (want is None)
            if got is None:
                made.append((rid, idx))
        elif made:
            which, actual = args
            rid, idx = made[which % len(made)]
            s = Settlement(rid, tuple(SettleLine(env.counters[i], None) for i in idx), actual)
            await env.b.settle([s], now=NOW)
            await ref.settle([s], now=NOW)
        assert await states(env) == [(v[0], v[1]) for v in (ref.counters[c] for c in env.counters)]


# -- definitions ------------------------------------------------------------------------------------


async def test_definitions_crud_and_validation(tmp_path: Any) -> None:
    store = await Store.open(sqlite_url(tmp_path / "s.db"))
    try:
        t = await store.tenants.create("acme")
        other = await store.tenants.create("globex")
        _, key = await store.keys.create("acme", role="member")
        repo = BudgetRepository(store.engine)
        b = await repo.create(tenant_id=t.id, key_id=None, period="monthly", soft_limit_usd_micros=5,
                              hard_limit_usd_micros=10)
        assert b.id.startswith("bud_") and b.scope == "tenant" and await repo.get(b.id) == b
        with pytest.raises(ConflictError):
            await repo.create(tenant_id=t.id, key_id=None, period="monthly", soft_limit_usd_micros=None,
                              hard_limit_usd_micros=1)
        k = await repo.create(tenant_id=t.id, key_id=key.id, period="monthly", soft_limit_usd_micros=None,
                              hard_limit_usd_micros=1)
        g = await repo.create(tenant_id=other.id, key_id=None, period="total", soft_limit_usd_micros=1,
                              hard_limit_usd_micros=None)
        assert {x.id for x in await repo.for_tenant(t.id)} == {b.id, k.id}
        assert {x.id for x in await repo.list()} == {b.id, k.id, g.id}
        changed = await repo.update(b.id, {"hard_limit_usd_micros": None})
        assert (changed.soft_limit_usd_micros, changed.hard_limit_usd_micros) == (5, None)
        assert changed.updated_at >= b.updated_at
        with pytest.raises(InvalidRequestError, match="soft limit, a hard limit, or both"):
            await repo.update(b.id, {"soft_limit_usd_micros": None})
        with pytest.raises(InvalidRequestError, match="not be above"):
            await repo.update(b.id, {"hard_limit_usd_micros": 4})
        with pytest.raises(ValueError, match="unknown period"):
            await repo.create(tenant_id=t.id, key_id=None, period="weekly", soft_limit_usd_micros=1,
                              hard_limit_usd_micros=None)
        assert (await repo.delete(k.id)).id == k.id
        with pytest.raises(NotFoundError):
            await repo.get(k.id)
        with pytest.raises(NotFoundError):
            await repo.delete("bud_" + "x" * 40)
        assert await repo.key_owner(key.id) == (t.id, "member") and await repo.key_owner("key_nope") is None
        assert await repo.tenant_by_name("globex") == (other.id, "globex") and await repo.tenant_by_name("x") is None
    finally:
        await store.close()


async def test_unreachable_backends_raise_budget_unavailable() -> None:
    from skyfleet.state.db import make_engine

    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    line = [ReserveLine(CounterRef("bud_x", "ten_x", START), 1, 10, None)]
    try:
        with pytest.raises(BudgetUnavailableError):
            await SqlBudgetCounters(engine).reserve(line, "r", now=NOW, expires_at=NOW + TTL)
    finally:
        await engine.dispose()
    down = RedisBudgetCounters("redis://127.0.0.1:1/0", prefix="x", timeout_s=0.5, ttl_s=60)
    try:
        with pytest.raises(BudgetUnavailableError):
            await down.reserve(line, "r", now=NOW, expires_at=NOW + TTL)
        with pytest.raises(BudgetUnavailableError):
            await down.settle([Settlement("r", (SettleLine(line[0].counter, None),), 1)], now=NOW)
    finally:
        await down.close()
