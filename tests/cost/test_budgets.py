"""Budgets, the pure parts and the gate: period windows, dollar amounts, the admission bound, the
429, and reserve/settle/alert through the gate on the in-process reference counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.clock import ManualClock
from skyfleet.config import BudgetSettings
from skyfleet.cost.budget_alerts import Alert, AlertSender
from skyfleet.cost.budget_gate import BudgetGate, Reservation
from skyfleet.cost.budgets import (
    EPOCH,
    MAX_USD_MICROS,
    BudgetDef,
    CounterRef,
    CounterState,
    MemoryBudgetCounters,
    ReserveLine,
    SettleLine,
    Settlement,
    completion_token_bound,
    format_usd,
    parse_usd,
    period_window,
    prompt_token_bound,
    refusal,
)
from skyfleet.cost.metering import usage_row
from skyfleet.cost.pricing import Pricing, ReplicaCost, TokenWeights
from skyfleet.errors import BudgetExceededError, NotFoundError, ServiceUnavailableError
from skyfleet.gateway.context import RequestRecord
from skyfleet.iam.principal import Principal

aware = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 12, 31),
                     timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                timezone(timedelta(hours=-11))]))


# -- period windows ------------------------------------------------------------------------------


@given(aware, st.sampled_from(["daily", "monthly"]))
def test_a_window_holds_now_is_aligned_and_the_next_one_starts_where_it_ends(now: datetime, period: str) -> None:
    start, end = period_window(period, now)
    assert end is not None and start <= now < end
    assert start.tzinfo == UTC and (start.hour, start.minute, start.second, start.microsecond) == (0, 0, 0, 0)
    if period == "daily":
        assert end - start == timedelta(days=1)
    else:
        assert start.day == 1 and end.day == 1 and 28 <= (end - start).days <= 31
    assert period_window(period, end)[0] == end
    assert period_window(period, end - timedelta(microseconds=1)) == (start, end)


@given(aware)
def test_total_is_one_window_forever(now: datetime) -> None:
    assert period_window("total", now) == (EPOCH, None)


def test_windows_golden() -> None:
    now = datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC)
    assert period_window("daily", now) == (datetime(2024, 2, 29, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))
    assert period_window("monthly", now) == (datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))
    dec = datetime(2024, 12, 31, 12, tzinfo=UTC)
    assert period_window("monthly", dec) == (datetime(2024, 12, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))
    # 01:00 in UTC+2 is the previous UTC day.
    east = datetime(2024, 3, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert period_window("daily", east)[0] == datetime(2024, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize("period", ["weekly", "", "DAILY", None, 1])
def test_unknown_periods_are_refused(period: object) -> None:
    with pytest.raises(ValueError, match="unknown period"):
        period_window(period, datetime.now(UTC))  # type: ignore[arg-type]


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_window("daily", datetime(2024, 1, 1))


# -- money ---------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=MAX_USD_MICROS))
def test_dollars_round_trip_exactly(micros: int) -> None:
    text = format_usd(micros)
    assert parse_usd(text) == micros
    assert parse_usd(Decimal(text)) == micros


@pytest.mark.parametrize(("value", "micros"), [
    ("12.50", 12_500_000), (12.5, 12_500_000), (1, 1_000_000), (0, 0), ("0.000001", 1), (" 3 ", 3_000_000),
    (0.1, 100_000), (1e2, 100_000_000), (1_000_000_000, MAX_USD_MICROS), ("1000000000.000000", MAX_USD_MICROS),
])
def test_dollars_accepted(value: object, micros: int) -> None:
    assert parse_usd(value) == micros


@pytest.mark.parametrize(("value", "why"), [
    ("-1", "negative"), (-0.5, "negative"), ("NaN", "finite"), (float("nan"), "finite"), ("inf", "finite"),
    (float("-inf"), "finite"), ("1.0000001", "6 decimals"), ("abc", "amount"), ("", "amount"), (True, "amount"),
    (None, "amount"), ([1], "amount"), ({"usd": 1}, "amount"), ("1_000", "amount"), ("1e400", "maximum"),
    (1_000_000_001, "maximum"), ("0x10", "amount"), ("1e2", "digits"), (".5", "digits"), ("+1", "digits"),
    ("\uff11", "digits"),  # a fullwidth digit one
])
def test_bad_dollars_are_refused_with_a_reason(value: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_usd(value)


def test_format_usd() -> None:
    assert [format_usd(m) for m in (0, 1, 10, 1_500_000, 1_234_567, 100_000_000)] == \
        ["0.00", "0.000001", "0.00001", "1.50", "1.234567", "100.00"]


# -- the admission bound -------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=200)), min_size=1,
                max_size=6))
def test_the_prompt_bound_covers_every_utf8_byte_and_each_message(messages: list[tuple[str, str]]) -> None:
    payload = {"messages": [{"role": r, "content": c} for r, c in messages]}
    raw = sum(len(c.encode()) for _, c in messages)
    assert prompt_token_bound(payload) >= raw + len(messages)


def test_prompt_bound_golden() -> None:
    assert prompt_token_bound({"prompt": "héllo"}) == 6 + 16
    assert prompt_token_bound({"prompt": [1, 2, 3]}) == 3 + 16
    assert prompt_token_bound({"prompt": ["ab"]}) == 2 + 16
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "text", "text": "d"}]}]}
    assert prompt_token_bound(parts) == 16 + 8 + 4


def test_completion_bound() -> None:
    assert completion_token_bound(7, 4096, 100) == 7
    assert completion_token_bound(None, 4096, 100) == 4096
    assert completion_token_bound(None, None, 100) == 100


# -- the refusal ---------------------------------------------------------------------------------


def _budget(**kw: object) -> BudgetDef:
    base = {"id": "bud_x", "tenant_id": "ten_a", "key_id": None, "period": "daily", "soft_limit_usd_micros": None,
            "hard_limit_usd_micros": 1_000_000, "created_at": EPOCH, "updated_at": EPOCH}
    return BudgetDef(**{**base, **kw})  # type: ignore[arg-type]


def test_the_429_names_the_budget_and_when_it_resets() -> None:
    now = datetime(2025, 3, 10, 22, 0, tzinfo=UTC)
    err = refusal(_budget(key_id="key_k"), hard_limit=1_000_000, state=CounterState(990_000, 5_000), amount=6_000,
                  now=now)
    assert isinstance(err, BudgetExceededError)
    body = err.body()["error"]
    assert (err.status, body["type"], body["code"]) == (429, "insufficient_quota", "budget_exceeded")
    assert "API key's daily budget (bud_x)" in body["message"] and "$1.00" in body["message"]
    assert "Spent $0.99" in body["message"] and "up to $0.006" in body["message"]
    assert "resets at 2025-03-11T00:00:00Z" in body["message"]
    assert err.headers == {"x-should-retry": "false", "Retry-After": "7200"}
    total = refusal(_budget(period="total"), hard_limit=5, state=None, amount=9, now=now)
    assert "tenant's total budget" in total.message and "does not reset" in total.message
    assert "Retry-After" not in total.headers


# -- the reference counters ----------------------------------------------------------------------

NOW = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass
class Op:
    kind: str  # reserve | settle | cancel | expire
    budgets: tuple[int, ...] = ()
    amount: int = 0
    actual: int = 0


ops = st.lists(st.one_of(
    st.builds(Op, st.just("reserve"), st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True)
              .map(tuple), amount=st.integers(0, 400)),
    st.builds(Op, st.just("settle"), actual=st.integers(0, 400)),
    st.builds(Op, st.just("expire")),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops, st.lists(st.integers(0, 1000) | st.none(), min_size=3, max_size=3))
def test_reservations_never_pass_a_hard_limit_and_settle_only_within_them(
        sequence: list[Op], hards: list[int | None]) -> None:
    """spent + reserved <= hard after every step (while settlements stay within their reservation);
    a refused reservation changes nothing; each reservation is released exactly once."""

    async def run() -> None:
        mem = MemoryBudgetCounters()
        counters = [CounterRef(f"b{i}", "t", NOW) for i in range(3)]
        open_: list[tuple[str, tuple[int, ...], int]] = []
        n = 0
        for op in sequence:
            if op.kind == "reserve":
                n += 1
                lines = [ReserveLine(counters[i], op.amount, hards[i], None) for i in op.budgets]
                before = {c: tuple(v) for c, v in mem.counters.items()}
                refused = await mem.reserve(lines, f"r{n}", now=NOW, expires_at=NOW + timedelta(seconds=n))
                if refused is None:
                    open_.append((f"r{n}", op.budgets, op.amount))
                else:
                    i = op.budgets[refused]
                    spent, reserved, _ = mem.counters.get(counters[i], (0, 0, 0))
                    assert hards[i] is not None and spent + reserved + op.amount > hards[i]
                    assert {c: tuple(v) for c, v in mem.counters.items() if c in before} == before
            elif op.kind == "settle" and open_:
                rid, budgets, amount = open_.pop(0)
                lines = tuple(SettleLine(counters[i], None) for i in budgets)
                await mem.settle([Settlement(rid, lines, min(op.actual, amount))], now=NOW)
                await mem.settle([Settlement(rid, lines, 0)], now=NOW)  # a second settlement releases nothing
            elif op.kind == "expire":  # a crashed gateway's reservations: released, never settled
                await mem.release_expired(now=NOW + timedelta(seconds=n / 2))
                held = {rid for rid, _ in mem.reservations}
                open_ = [o for o in open_ if o[0] in held]
            for i, c in enumerate(counters):
                spent, reserved, _ = mem.counters.get(c, (0, 0, 0))
                assert reserved >= 0 and spent >= 0
                if hards[i] is not None:
                    assert spent + reserved <= hards[i]
        live = {(rid, f"b{i}") for rid, budgets, _ in open_ for i in budgets}
        assert set(mem.reservations) <= live

    asyncio.run(run())


# -- the gate ------------------------------------------------------------------------------------


@dataclass
class Definitions:
    """The repository's read side, over a list (the real one is tested in tests/state)."""

    budgets: list[BudgetDef] = field(default_factory=list)
    loads: int = 0

    async def for_tenant(self, tenant_id: str) -> tuple[BudgetDef, ...]:
        self.loads += 1
        return tuple(b for b in self.budgets if b.tenant_id == tenant_id)

    async def get(self, budget_id: str) -> BudgetDef:
        for b in self.budgets:
            if b.id == budget_id:
                return b
        raise NotFoundError("no")


def pricing() -> Pricing:
    # $3.60/h at 1000 weighted tokens/s: 1 micro-dollar per weighted token; cached tokens a tenth.
    return Pricing([ReplicaCost("local-0", "local", "m", "local", 3.6)], weights=TokenWeights(1.0, 0.1, 1.0),
                   nominal_tokens_per_s={}, default_tokens_per_s=1000.0)


@dataclass
class Sent:
    alerts: list[Alert] = field(default_factory=list)

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def close(self) -> None:
        return None


ALICE = Principal(tenant_id="ten_a", tenant_name="a", role="member", key_id="key_a")
BOB = Principal(tenant_id="ten_a", tenant_name="a", role="member", key_id="key_b")


def gate(defs: Definitions, backend: MemoryBudgetCounters | None = None, **conf: object) -> BudgetGate:
    clock = ManualClock(wall_offset=NOW.timestamp())
    g = BudgetGate(definitions=defs, backend=backend or MemoryBudgetCounters(), pricing=pricing(),  # type: ignore[arg-type]
                   settings=BudgetSettings(**conf), clock=clock)
    g.alerts = Sent()  # type: ignore[assignment]
    return g


def record(r: Reservation | None, prompt: int, completion: int, cached: int = 0, **kw: object) -> RequestRecord:
    fields: dict[str, object] = {"status": "completed", "http_status": 200, "replica_id": "local-0", **kw}
    return RequestRecord(request_id="req", tenant_id="ten_a", tenant_name="a", key_id="key_a", model="m",
                         route="completions", stream=False, prompt_tokens=prompt, completion_tokens=completion,
                         cached_tokens=cached, reservation=r, **fields)  # type: ignore[arg-type]


async def test_admit_reserves_on_the_tenant_and_key_budgets_and_settlement_charges_the_actual() -> None:
    tenant = _budget(id="bud_t", hard_limit_usd_micros=1000, soft_limit_usd_micros=150)
    mine = _budget(id="bud_k", key_id="key_a", period="total", hard_limit_usd_micros=None, soft_limit_usd_micros=10)
    other = _budget(id="bud_o", key_id="key_b", hard_limit_usd_micros=1)
    g = gate(Definitions([tenant, mine, other, _budget(id="bud_z", tenant_id="ten_z")]))
    r = await g.admit(ALICE, "m", prompt_tokens=50, max_tokens=30, context_window=4096)
    assert r is not None and r.amount == 80 and {b.id for b in r.budgets} == {"bud_t", "bud_k"}
    mem = g.backend
    assert isinstance(mem, MemoryBudgetCounters)
    assert {c.budget_id: v[1] for c, v in mem.counters.items()} == {"bud_t": 80, "bud_k": 80}
    g.on_finish(record(r, prompt=40, completion=20, cached=10))  # 30 + 1 (10 * 0.1) + 20 = 51
    assert g.pending == 1 and await g.flush()
    assert {c.budget_id: v[:2] for c, v in mem.counters.items()} == {"bud_t": [51, 0], "bud_k": [51, 0]}
    # The key's soft limit (10) was crossed: one alert for it, none for the tenant's (150) yet.
    alerts = g.alerts.alerts  # type: ignore[attr-defined]
    assert [(a.budget.id, a.spent_usd_micros) for a in alerts] == [("bud_k", 51)]
    r2 = await g.admit(ALICE, "m", prompt_tokens=100, max_tokens=20, context_window=None)
    g.on_finish(record(r2, prompt=100, completion=20))
    await g.flush()
    assert [a.budget.id for a in alerts] == ["bud_k", "bud_t"]  # once per budget and period
    g.on_finish(record(await g.admit(ALICE, "m", prompt_tokens=1, max_tokens=1, context_window=None), 1, 1))
    await g.flush()
    assert len(alerts) == 2


@pytest.mark.parametrize(("replica", "charge"), [
    ("local-0", 560),   # its replica's price: 300 uncached + 10 (100 cached x 0.1) + 250 = 560 weighted x $1/M
    ("big-0", 5600),    # ten times dearer
    ("gone-7", 5600),   # a replica the price list no longer knows, or none: the model's (dearest) price
    (None, 5600),
])
async def test_settlement_charges_exactly_what_the_usage_record_stores(replica: str | None, charge: int) -> None:
    prices = Pricing([ReplicaCost("local-0", "local", "m", "local", 3.6),
                      ReplicaCost("big-0", "big", "m", "spot", 36.0)],
                     weights=TokenWeights(1.0, 0.1, 1.0), nominal_tokens_per_s={}, default_tokens_per_s=1000.0)
    mem = MemoryBudgetCounters()
    defs = Definitions([_budget(hard_limit_usd_micros=1_000_000)])
    g = BudgetGate(definitions=defs, backend=mem, pricing=prices,  # type: ignore[arg-type]
                   settings=BudgetSettings(), clock=ManualClock(wall_offset=NOW.timestamp()))
    g.alerts = Sent()  # type: ignore[assignment]
    r = await g.admit(ALICE, "m", prompt_tokens=400, max_tokens=300, context_window=None)
    finished = record(r, 400, 250, cached=100, replica_id=replica)
    g.on_finish(finished)
    assert await g.flush()
    assert list(mem.counters.values()) == [[charge, 0, 0]]
    assert usage_row(finished, prices)["charged_usd_micros"] == charge  # one function prices both


async def test_a_hard_limit_refuses_with_nothing_reserved_anywhere() -> None:
    defs = Definitions([_budget(id="bud_t", hard_limit_usd_micros=10_000),
                        _budget(id="bud_k", key_id="key_a", hard_limit_usd_micros=100)])
    g = gate(defs)
    with pytest.raises(BudgetExceededError) as caught:
        await g.admit(ALICE, "m", prompt_tokens=90, max_tokens=20, context_window=None)
    assert "API key's daily budget (bud_k)" in caught.value.message
    assert all(v == [0, 0, 0] for v in g.backend.counters.values())  # type: ignore[union-attr]
    # Bob's key has no budget of its own: only the tenant's applies.
    assert await g.admit(BOB, "m", prompt_tokens=90, max_tokens=20, context_window=None) is not None


async def test_no_max_tokens_reserves_the_context_window() -> None:
    g = gate(Definitions([_budget(hard_limit_usd_micros=5000)]))
    r = await g.admit(ALICE, "m", prompt_tokens=10, max_tokens=None, context_window=2048)
    assert r is not None and r.amount == 10 + 2048
    with pytest.raises(BudgetExceededError):
        await g.admit(ALICE, "m", prompt_tokens=10, max_tokens=None, context_window=4096)


async def test_a_lowered_budget_applies_to_the_next_request_once_invalidated() -> None:
    b = _budget(hard_limit_usd_micros=1_000)
    defs = Definitions([b])
    g = gate(defs, cache_ttl_s=300)
    r = await g.admit(ALICE, "m", prompt_tokens=100, max_tokens=100, context_window=None)
    g.on_finish(record(r, 100, 100))
    await g.flush()
    defs.budgets = [replace(b, hard_limit_usd_micros=150)]  # below the 200 already spent
    assert await g.admit(ALICE, "m", prompt_tokens=1, max_tokens=1, context_window=None) is not None  # cached
    g.invalidate("ten_a")
    with pytest.raises(BudgetExceededError):
        await g.admit(ALICE, "m", prompt_tokens=1, max_tokens=1, context_window=None)


async def test_cancel_releases_once_and_a_second_record_charges_without_releasing_again() -> None:
    g = gate(Definitions([_budget(hard_limit_usd_micros=1_000)]))
    mem = g.backend
    r = await g.admit(ALICE, "m", prompt_tokens=10, max_tokens=10, context_window=None)
    g.cancel(r)
    g.cancel(r)
    await g.flush()
    assert list(mem.counters.values()) == [[0, 0, 0]]  # type: ignore[union-attr]
    r = await g.admit(ALICE, "m", prompt_tokens=10, max_tokens=10, context_window=None)
    g.on_finish(record(r, 0, 0, status="failed"))  # a truncation retry: the first attempt failed ...
    g.on_finish(record(r, 8, 5))  # ... the second is charged, with nothing left to release
    await g.flush()
    assert list(mem.counters.values()) == [[13, 0, 0]]  # type: ignore[union-attr]


async def test_definitions_are_cached_per_tenant_and_nothing_is_reserved_without_budgets() -> None:
    defs = Definitions([])
    g = gate(defs, cache_ttl_s=60)
    assert await asyncio.gather(*(g.admit(ALICE, "m", prompt_tokens=1, max_tokens=1, context_window=None)
                                  for _ in range(20))) == [None] * 20
    assert defs.loads == 1
    assert await BudgetGate.disabled().admit(ALICE, "m", prompt_tokens=1, max_tokens=1, context_window=None) is None


class Down(MemoryBudgetCounters):
    async def reserve(self, *a: object, **kw: object) -> int | None:
        from skyfleet.cost.budgets import BudgetUnavailableError

        raise BudgetUnavailableError("ConnectionError")


async def test_unreachable_counters_deny_by_default_or_allow_when_configured() -> None:
    defs = Definitions([_budget()])
    with pytest.raises(ServiceUnavailableError) as caught:
        await gate(defs, Down()).admit(ALICE, "m", prompt_tokens=1, max_tokens=1, context_window=None)
    assert caught.value.code == "budget_unavailable" and caught.value.headers["Retry-After"] == "1"
    assert await gate(defs, Down(), on_error="allow").admit(ALICE, "m", prompt_tokens=1, max_tokens=1,
                                                            context_window=None) is None


# -- alerts --------------------------------------------------------------------------------------


def test_the_alert_body_holds_ids_and_amounts_only() -> None:
    alert = Alert(_budget(key_id="key_k", soft_limit_usd_micros=500_000), datetime(2025, 3, 10, tzinfo=UTC),
                  612_345, 500_000, datetime(2025, 3, 10, 13, tzinfo=UTC))
    assert alert.body() == {
        "type": "budget.soft_limit_reached", "budget_id": "bud_x", "tenant_id": "ten_a", "key_id": "key_k",
        "scope": "key", "period": "daily", "period_start": "2025-03-10T00:00:00+00:00",
        "period_end": "2025-03-11T00:00:00+00:00", "soft_limit_usd": "0.50", "soft_limit_usd_micros": 500_000,
        "spent_usd": "0.612345", "spent_usd_micros": 612_345, "hard_limit_usd_micros": 1_000_000,
        "at": "2025-03-10T13:00:00+00:00"}


async def test_a_webhook_gets_the_alert_after_retries_and_never_blocks(unused_tcp_port: int) -> None:
    from aiohttp import web

    got: list[dict[str, object]] = []
    calls = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.Response(status=503)
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    sender = AlertSender(f"http://127.0.0.1:{unused_tcp_port}/hook", timeout_s=2, retries=2, backoff_s=0.01)
    try:
        sender.send(Alert(_budget(soft_limit_usd_micros=1), NOW, 5, 1, NOW))  # returns at once
        await sender.wait_idle(10)
        assert calls == 2 and [g["budget_id"] for g in got] == ["bud_x"] and sender.sent == 1
        dead = AlertSender(f"http://127.0.0.1:{unused_tcp_port}/missing", timeout_s=1, retries=1, backoff_s=0.01)
        dead.send(Alert(_budget(), NOW, 5, 1, NOW))
        await dead.wait_idle(10)
        assert dead.failed == 1
        await dead.close()
    finally:
        await sender.close()
        await runner.cleanup()


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("conf", "says"), [
    ({"backend": "postgres"}, "'auto', 'database' or 'redis'"),
    ({"webhook_url": "http://hooks.example.com/x"}, "https://"),
    ({"reservation_ttl_s": 0}, "greater than or equal to 1"),
    ({"webhook_retries": -1}, "greater than or equal to 0"),
    ({"on_error": "maybe"}, "'deny' or 'allow'"),
])
def test_bad_budget_settings_fail_start_up_with_the_field_named(conf: dict[str, object], says: str) -> None:
    from skyfleet.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="budgets") as caught:
        load_settings(budgets=conf)
    assert says in str(caught.value)


def test_the_redis_backend_needs_redis_url() -> None:
    from skyfleet.config import ConfigError, Settings
    from skyfleet.cost.budget_gate import open_backend

    with pytest.raises(ConfigError, match="redis_url"):
        open_backend(Settings(budgets={"backend": "redis"}), None)  # type: ignore[arg-type]
    assert BudgetSettings(webhook_url="http://127.0.0.1:9/x").webhook_url is not None  # type: ignore[arg-type]
