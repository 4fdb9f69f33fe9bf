"""Rate limits: the pure bucket arithmetic (properties and golden vectors), the limiter in front of it,
and the wiring through a real in-process gateway (SQLite store, simulated engine, the openai SDK)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from skyfleet.api.app import build_app
from skyfleet.clock import ManualClock
from skyfleet.config import LimitSettings, Settings
from skyfleet.engines.sim import SimProfile
from skyfleet.engines.sim import build_app as sim_app
from skyfleet.errors import RateLimitError
from skyfleet.gateway.context import CompositeObserver, RequestRecord
from skyfleet.gateway.ratelimit import (
    PERIOD_S,
    TOLERANCE_S,
    Admission,
    BucketState,
    InProcessBuckets,
    RateLimiter,
    adjust,
    check_all,
    duration_text,
    estimate_tokens,
    refill,
    request_size,
)
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway
from tests.threaded_server import serve_in_thread

SLOW = settings(deadline=None, max_examples=150)


def one(state: BucketState | None, now: float, limit: int, cost: float) -> tuple[Any, BucketState | None]:
    decision, [new] = check_all([state], now, [limit], [cost])
    return decision, new


# -- golden vectors -----------------------------------------------------------------------------


def test_golden_requests_bucket() -> None:
    state = None
    for k in range(60):  # a fresh bucket of 60/min admits 60 at once...
        d, state = one(state, 100.0, 60, 1)
        assert d.allowed and d.buckets[0].remaining == 59 - k and d.buckets[0].reset_s == pytest.approx(k + 1)
    d, same = one(state, 100.0, 60, 1)  # ...then one per second
    assert not d.allowed and same is state
    assert d.buckets[0].wait_s == pytest.approx(1.0) and d.buckets[0].remaining == 0
    assert d.buckets[0].reset_s == pytest.approx(60.0)
    d, _ = one(state, 100.5, 60, 1)
    assert not d.allowed and d.buckets[0].wait_s == pytest.approx(0.5)
    d, state = one(state, 101.0, 60, 1)
    assert d.allowed and d.buckets[0].remaining == 0
    assert state == BucketState(pytest.approx(60.0), 101.0)  # type: ignore[arg-type]


def test_golden_tokens_bucket() -> None:
    d, state = one(None, 0.0, 1000, 400)
    assert d.allowed and d.buckets[0].remaining == 600 and d.buckets[0].reset_s == pytest.approx(24.0)
    d, _ = one(state, 0.0, 1000, 700)
    assert not d.allowed and d.buckets[0].wait_s == pytest.approx(6.0)
    d, _ = one(state, 0.0, 1000, 5000)  # more than a minute's capacity is charged as a full minute
    assert not d.allowed and d.buckets[0].wait_s == pytest.approx(24.0)
    assert adjust(state, 0.0, -300, 1000) == BucketState(100.0, 0.0)  # refund
    assert adjust(state, 6.0, -1000, 1000) == BucketState(0.0, 6.0)  # never below empty
    debt = adjust(state, 0.0, 2600, 1000)  # reconciliation may leave the bucket in debt
    assert debt.level == 3000
    d, _ = one(debt, 60.0, 1000, 1)
    assert not d.allowed and d.buckets[0].wait_s == pytest.approx(60.06)


def test_golden_text_and_estimates() -> None:
    assert [duration_text(s) for s in (0, 0.0004, 0.02, 0.9999, 1.5, 59.9996, 60, 61.25, 360)] == [
        "0s", "1ms", "20ms", "1s", "1.5s", "1m0s", "1m0s", "1m1.25s", "6m0s"]
    assert estimate_tokens(0, None, 256) == 256
    assert estimate_tokens(5, 10, 256) == 12  # ceil(5 / 4) + max_tokens
    assert estimate_tokens(8, None, 100) == 102
    assert request_size("123", {"x": 1}) == 123
    assert request_size(None, {"x": 1}) == len(b'{"x":1}')


# -- properties ---------------------------------------------------------------------------------

_ops = st.lists(
    st.tuples(st.sampled_from(["acquire", "adjust"]), st.floats(0, 5), st.integers(-700, 700)),
    max_size=200,
)


@SLOW
@given(limit=st.integers(1, 500), start=st.floats(0, 2e9), ops=_ops)
@example(limit=1, start=1.7e9, ops=[("acquire", 0.0, 1)] * 3)
@example(limit=50, start=1.7e9, ops=[("acquire", 0.0, 1)] * 60 + [("acquire", 0.6, 1)] * 60)
def test_never_more_than_the_limit_plus_the_burst_in_any_window(limit: int, start: float,
                                                               ops: list[tuple[str, float, int]]) -> None:
    """Any window of W seconds admits at most limit * (1 + W / period): the burst is one minute's limit."""
    state, now, admitted = None, start, []
    for op, dt, amount in ops:
        now += dt
        if op == "adjust":  # reconciliation may only ever make the bucket fuller, never add room...
            state = adjust(state, now, abs(amount), limit)  # ...so only debits here
            continue
        cost = max(1, abs(amount))
        d, state = one(state, now, limit, cost)
        if d.allowed:
            admitted.append((now, min(cost, limit)))
    slack = len(ops) * limit * (2 * TOLERANCE_S) / PERIOD_S + 1e-6
    for window in (0.0, 1.0, PERIOD_S / 2, PERIOD_S, 3 * PERIOD_S):
        for i, (t0, _) in enumerate(admitted):
            used = sum(c for t, c in admitted[i:] if t <= t0 + window)
            assert used <= limit * (1 + window / PERIOD_S) + slack


@SLOW
@given(limit=st.integers(1, 3000), start=st.floats(0, 2e9))
def test_a_fresh_bucket_admits_exactly_the_limit_at_once(limit: int, start: float) -> None:
    state, admitted = None, 0
    while True:
        d, state = one(state, start, limit, 1)
        if not d.allowed:
            break
        admitted += 1
    assert admitted == limit
    assert d.buckets[0].wait_s == pytest.approx(PERIOD_S / limit, rel=1e-6)


@SLOW
@given(limit=st.integers(1, 1000), start=st.floats(0, 2e9), burst_first=st.booleans())
def test_requests_spaced_at_the_rate_are_all_admitted(limit: int, start: float, burst_first: bool) -> None:
    state = None
    if burst_first:  # even right after using the whole burst
        for _ in range(limit):
            d, state = one(state, start, limit, 1)
            assert d.allowed
    for k in range(1, min(3 * limit, 1500) + 1):
        d, state = one(state, start + k * PERIOD_S / limit, limit, 1)
        assert d.allowed, k
    # One more, earlier than the rate allows, is refused when the bucket is empty.
    if burst_first:
        early = start + (min(3 * limit, 1500) + 0.5) * PERIOD_S / limit
        assert not one(state, early, limit, 1)[0].allowed


@SLOW
@given(limit=st.integers(1, 100_000), start=st.floats(0, 2e9), ops=_ops, cost=st.integers(1, 200_000))
def test_retry_after_is_exact(limit: int, start: float, ops: list[tuple[str, float, int]], cost: int) -> None:
    state, now = None, start
    for op, dt, amount in ops:
        now += dt
        if op == "adjust":
            state = adjust(state, now, amount, limit)
        else:
            state = one(state, now, limit, abs(amount) or 1)[1]
    d, after = one(state, now, limit, cost)
    if d.allowed:
        return
    wait = d.buckets[0].wait_s
    assert after is state  # refused: nothing consumed
    assert wait > TOLERANCE_S
    assert one(state, now + wait, limit, cost)[0].allowed
    if wait > 2e-5:
        assert not one(state, now + wait - 2e-5, limit, cost)[0].allowed


@SLOW
@given(limits=st.lists(st.integers(1, 1000), min_size=2, max_size=4), start=st.floats(0, 1e6),
       fill=st.lists(st.integers(0, 1000), min_size=4, max_size=4), costs=st.lists(st.integers(1, 1000), min_size=4,
                                                                                 max_size=4))
def test_a_refused_request_consumes_nothing_from_any_bucket(limits: list[int], start: float, fill: list[int],
                                                           costs: list[int]) -> None:
    n = len(limits)
    states: list[BucketState | None] = [BucketState(float(min(f, lim)), start) for f, lim in zip(fill, limits)]
    decision, new = check_all(states, start, limits, costs[:n])
    expected = all(min(f, lim) + min(c, lim) <= lim for f, c, lim in zip(fill, costs, limits))
    assert decision.allowed == expected
    if not decision.allowed:
        assert new == states
        for r, s, lim in zip(decision.buckets, states, limits):
            assert s is not None and r.remaining == math.floor(lim - s.level)
    else:
        assert [s.level for s in new if s] == [min(f, lim) + min(c, lim) for f, c, lim in zip(fill, costs, limits)]


@SLOW
@given(limit=st.integers(1, 10_000), level=st.floats(0, 50_000), delta=st.floats(0, 50_000),
       now=st.floats(0, 2e9), later=st.floats(0, 120))
def test_reconciliation_round_trips_and_never_goes_below_empty(limit: int, level: float, delta: float, now: float,
                                                               later: float) -> None:
    state = BucketState(level, now)
    back = adjust(adjust(state, now, delta, limit), now, -delta, limit)
    assert back.level == pytest.approx(level, abs=1e-6 * max(1.0, level + delta))
    assert adjust(state, now + later, -delta - level - 1, limit).level == 0
    assert refill(state, now + later, limit).level == pytest.approx(max(0.0, level - later * limit / PERIOD_S),
                                                                    abs=1e-6 * max(1.0, level))


def test_a_clock_that_goes_backwards_refills_nothing() -> None:
    state = BucketState(10.0, 50.0)
    assert refill(state, 40.0, 60) == state
    d, new = one(state, 40.0, 60, 1)
    assert d.allowed and new == BucketState(11.0, 50.0)


# -- the limiter (in-process buckets, manual clock) ---------------------------------------------


def principal(tenant: str = "t-1", key: str = "key-1", **limits: int | None) -> Principal:
    return Principal(tenant_id=tenant, tenant_name="acme", role="member", key_id=key, **limits)  # type: ignore[arg-type]


def record(adm: Admission | None, prompt: int, completion: int, tenant: str = "t-1") -> RequestRecord:
    return RequestRecord(request_id="r", tenant_id=tenant, tenant_name="acme", key_id="key-1", model="m", route="chat",
                         stream=False, status="completed", http_status=200, prompt_tokens=prompt,
                         completion_tokens=completion, admission=adm)


def limiter(clock: ManualClock, **limits: Any) -> tuple[RateLimiter, InProcessBuckets]:
    store = InProcessBuckets(clock)
    return RateLimiter(store, LimitSettings(**limits)), store


PAYLOAD = {"model": "m", "prompt": "x" * 100}


async def test_which_buckets_apply() -> None:
    rl, store = limiter(ManualClock(), default_tenant_rpm=100)
    assert [(b.key, b.limit) for b in rl.buckets(principal())] == [("skyfleet:rl:{t-1}:rpm", 100)]
    both = rl.buckets(principal(tenant_rpm_limit=5, tenant_tpm_limit=50, rpm_limit=2, tpm_limit=20))
    assert [(b.key, b.limit, b.kind, b.scope) for b in both] == [
        ("skyfleet:rl:{t-1}:rpm", 5, "requests", "tenant"),
        ("skyfleet:rl:{t-1}:key:key-1:rpm", 2, "requests", "API key"),
        ("skyfleet:rl:{t-1}:tpm", 50, "tokens", "tenant"),
        ("skyfleet:rl:{t-1}:key:key-1:tpm", 20, "tokens", "API key"),
    ]
    unlimited, store = limiter(ManualClock())
    assert unlimited.buckets(principal()) == []
    assert await unlimited.admit(principal(), PAYLOAD, None, 10) is None
    assert len(store) == 0


async def test_refusal_is_openai_shaped_and_consumes_nothing() -> None:
    clock = ManualClock()
    rl, store = limiter(clock)
    p = principal(tenant_rpm_limit=10, rpm_limit=2, tenant_tpm_limit=1000)
    for left in (1, 0):
        adm = await rl.admit(p, PAYLOAD, "100", 5)
        assert adm is not None and adm.headers["x-ratelimit-remaining-requests"] == str(left)
        assert adm.headers["x-ratelimit-limit-requests"] == "2"  # the key's limit is the tighter one
        assert adm.headers["x-ratelimit-limit-tokens"] == "1000"
    tenant_rpm, tenant_tpm = store.level("skyfleet:rl:{t-1}:rpm", 10), store.level("skyfleet:rl:{t-1}:tpm", 1000)
    with pytest.raises(RateLimitError) as info:
        await rl.admit(p, PAYLOAD, "100", 5)
    err = info.value
    assert (err.status, err.type, err.code) == (429, "requests", "rate_limit_exceeded")
    assert err.headers["Retry-After"] == "30" and err.headers["retry-after-ms"] == "30000"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "Limit 2, Used 2, Requested 1" in err.message and "API key" in err.message and "30s" in err.message
    assert "key-1" not in err.message and "t-1" not in err.message
    # Nothing was taken from the tenant's buckets by the refused request.
    assert store.level("skyfleet:rl:{t-1}:rpm", 10) == tenant_rpm
    assert store.level("skyfleet:rl:{t-1}:tpm", 1000) == tenant_tpm
    clock.advance(29.9)
    with pytest.raises(RateLimitError) as info:
        await rl.admit(p, PAYLOAD, "100", 5)
    assert info.value.headers["Retry-After"] == "1" and info.value.headers["retry-after-ms"] == "100"
    clock.advance(0.1)
    assert await rl.admit(p, PAYLOAD, "100", 5) is not None


async def test_tokens_are_estimated_then_reconciled() -> None:
    clock = ManualClock()
    rl, store = limiter(clock, default_tenant_tpm=1000, estimate_completion_tokens=50)
    key = "skyfleet:rl:{t-1}:tpm"
    adm = await rl.admit(principal(), PAYLOAD, "400", None)  # 400 / 4 + 50
    assert adm is not None and adm.charged == (150.0,) and store.level(key, 1000) == 150
    assert adm.headers == {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "850",
                           "x-ratelimit-reset-tokens": "9s"}
    observer = CompositeObserver(rl)
    observer.on_finish(record(adm, 30, 12))  # refund: 150 charged, 42 used
    assert store.level(key, 1000) == 42
    observer.on_finish(record(adm, 200, 10))  # a second record (truncation retry) is charged in full
    assert store.level(key, 1000) == 252
    rl.cancel(adm)  # already settled: no double refund
    assert store.level(key, 1000) == 252
    with pytest.raises(RateLimitError):  # bigger than a minute: charged as a minute, so it waits for a full bucket
        await rl.admit(principal(), PAYLOAD, "4000", 5000)
    clock.advance(60)
    adm2 = await rl.admit(principal(), PAYLOAD, "4000", 5000)
    assert adm2 is not None and adm2.charged == (1000.0,)
    rl.on_finish(record(adm2, 3000, 3000))  # ...and reconciled to the real usage: debt
    with pytest.raises(RateLimitError) as info:
        await rl.admit(principal(), PAYLOAD, "4", 1)
    assert info.value.type == "tokens" and info.value.headers["Retry-After"] == str(math.ceil(5002 * 0.06))
    clock.advance(360)
    adm3 = await rl.admit(principal(), PAYLOAD, "40", 10)
    assert adm3 is not None
    rl.cancel(adm3)  # the request failed before any engine saw it
    assert store.level(key, 1000) == 0


async def test_a_zero_limit_refuses_everything() -> None:
    rl, _ = limiter(ManualClock())
    with pytest.raises(RateLimitError) as info:
        await rl.admit(principal(tpm_limit=0), PAYLOAD, None, 1)
    assert info.value.type == "tokens" and "limit is 0" in info.value.message


async def test_many_keys_do_not_grow_memory_forever() -> None:
    clock = ManualClock()
    rl, store = limiter(clock)
    for i in range(3000):
        await rl.admit(principal(tenant=f"t{i}", tenant_rpm_limit=60), PAYLOAD, None, 1)
        clock.advance(0.1)
    assert len(store) <= 1100  # the full ones were forgotten along the way


# -- through the gateway: real store, simulated engine, the openai SDK --------------------------


@dataclass
class Stack:
    gw: Gateway
    clock: ManualClock
    asgi: Any

    def sdk(self, key: str) -> openai.AsyncOpenAI:
        transport = httpx.ASGITransport(app=self.asgi)
        return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=key, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=transport, base_url="http://gateway"))

    async def key(self, tenant: str, **limits: int) -> tuple[str, str, str]:
        """A new tenant (its limits set in the store) and a key of it: (key, key id, tenant id)."""
        t = await self.gw.store.tenants.create(tenant)
        tenant_limits = {k.removeprefix("tenant_"): v for k, v in limits.items() if k.startswith("tenant_")}
        if tenant_limits:
            await self.gw.store.tenants.update(tenant, tenant_limits)
        key_limits = {k: v for k, v in limits.items() if not k.startswith("tenant_")}
        plain, rec = await self.gw.store.keys.create(tenant, **key_limits)
        return plain, rec.id, t.id


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with serve_in_thread(sim_app(SimProfile(), model="sim-model", fast=True)) as url:
        yield url


@pytest.fixture(scope="module")
async def stack(sim_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    clock = ManualClock()
    static = [{"url": sim_url, "model": "m", "upstream_model": "sim-model", "engine": "sim", "context_window": 4096}]
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("rl") / "data", bootstrap=False, local={"replicas": 0},
                         static_replicas=static)  # type: ignore[arg-type]
    gw = await Gateway.create(settings_, clock=clock)
    await gw.start()
    try:
        assert await gw.wait_ready(10)
        yield Stack(gw, clock, build_app(gw, manage_lifecycle=False))
    finally:
        await gw.stop()


async def test_sdk_sees_429_with_openai_headers_and_limits_from_the_store(stack: Stack) -> None:
    key, key_id, tenant_id = await stack.key("rl-sdk", tenant_rpm_limit=10, rpm_limit=2)
    client = stack.sdk(key)
    for left in ("1", "0"):
        raw = await client.completions.with_raw_response.create(model="m", prompt="hi", max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == left
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no token limit applies
        assert raw.parse().choices
    with pytest.raises(openai.RateLimitError) as info:
        await client.completions.create(model="m", prompt="hi", max_tokens=2)
    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
    assert err.response.headers["retry-after"] == "30"
    assert err.response.headers["x-ratelimit-limit-requests"] == "2"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.response.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert key not in err.message and key_id not in err.message and tenant_id not in err.message
    assert stack.gw.metrics.registry.get_sample_value("skyfleet_ratelimited_requests_total",
                                                      {"kind": "requests"}) >= 1
    stack.clock.advance(30)
    assert (await client.completions.create(model="m", prompt="hi", max_tokens=2)).choices
    # Another key of the same tenant has its own key bucket but shares the tenant's.
    other, _ = await stack.gw.store.keys.create("rl-sdk")
    raw = await stack.sdk(other).completions.with_raw_response.create(model="m", prompt="hi", max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "10"
    assert raw.headers["x-ratelimit-remaining-requests"] == "8"


async def test_headers_on_streams_and_responses_and_tokens_reconciled(stack: Stack) -> None:
    key, _, tenant_id = await stack.key("rl-tokens", tenant_tpm_limit=100_000, rpm_limit=100)
    client = stack.sdk(key)
    store = stack.gw.limits.store
    assert isinstance(store, InProcessBuckets)
    bucket = f"skyfleet:rl:{{{tenant_id}}}:tpm"

    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    chunks = [c async for c in raw.parse()]
    usage = chunks[-1].usage
    assert usage is not None
    assert store.level(bucket, 100_000) == usage.prompt_tokens + usage.completion_tokens

    raw = await client.responses.with_raw_response.create(model="m", input="Hello", max_output_tokens=4)
    assert raw.headers["x-ratelimit-remaining-requests"] == "98"
    resp = raw.parse()
    assert resp.usage is not None
    used = usage.prompt_tokens + usage.completion_tokens + resp.usage.total_tokens
    assert store.level(bucket, 100_000) == used

    raw = await client.responses.with_raw_response.create(model="m", input="Hello", max_output_tokens=4, stream=True)
    assert raw.headers["x-ratelimit-remaining-requests"] == "97"
    events = [e async for e in raw.parse()]
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage is not None
    assert store.level(bucket, 100_000) == used + done.response.usage.total_tokens


async def test_a_request_refused_before_the_engine_is_refunded(stack: Stack) -> None:
    key, _, tenant_id = await stack.key("rl-refund", tenant_tpm_limit=100_000)
    client = stack.sdk(key)
    with pytest.raises(openai.BadRequestError):  # tools: refused by the Responses service after admission
        await client.responses.create(model="m", input="Hi", tools=[{"type": "function", "name": "f",
                                                                     "parameters": {}}])
    with pytest.raises(openai.NotFoundError):  # no such previous response
        await client.responses.create(model="m", input="Hi", previous_response_id="resp_nope")
    store = stack.gw.limits.store
    assert isinstance(store, InProcessBuckets)
    assert store.level(f"skyfleet:rl:{{{tenant_id}}}:tpm", 100_000) == 0
