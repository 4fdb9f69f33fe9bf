"""Rate-limit buckets in a real Redis: the Lua scripts equal the Python arithmetic, atomic across
gateways, NOSCRIPT fallback, key names and TTLs, and what happens when Redis is down."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from skyfleet.config import LimitSettings
from skyfleet.errors import ServiceUnavailableError
from skyfleet.gateway.context import RequestRecord
from skyfleet.gateway.ratelimit import PERIOD_S, BucketState, RateLimiter, adjust, check_all, refill
from skyfleet.gateway.ratelimit_redis import RETRY_AFTER_S, RedisBuckets
from skyfleet.iam.principal import Principal

REDIS_URL = os.environ.get("SKYFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards. Fails if Redis is down."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({type(exc).__name__}); start it (see .ci/run)")
    name = "skyfleet-test-" + secrets.token_hex(4)
    yield name
    keys = [k async for k in client.scan_iter(match=f"{name}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def buckets(now: Any = None) -> RedisBuckets:
    return RedisBuckets(REDIS_URL, timeout_s=1.0, max_connections=16, now=now)


def principal(**limits: int) -> Principal:
    return Principal(tenant_id="tenant-1", tenant_name="acme", role="member", key_id="key-1", **limits)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


_bucket_ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "adjust"]),
        st.floats(0, 30),  # time step
        st.lists(st.integers(-300, 400), min_size=4, max_size=4),  # cost / delta per bucket
        st.lists(st.booleans(), min_size=4, max_size=4),  # which buckets take part
    ),
    min_size=1, max_size=25,
)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=st.lists(st.integers(1, 5000), min_size=4, max_size=4), start=st.floats(0, 2e9), ops=_bucket_ops)
async def test_lua_scripts_compute_exactly_what_the_python_does(
        prefix: str, limits: list[int], start: float, ops: list[tuple[str, float, list[int], list[bool]]]) -> None:
    clock = Clock(start)
    store = buckets(clock)
    run = secrets.token_hex(4)
    keys = [f"{prefix}:{{t}}:{run}:{i}" for i in range(4)]
    mirror: dict[str, BucketState | None] = dict.fromkeys(keys)
    try:
        for op, dt, amounts, use in ops:
            clock.t += dt
            chosen = [i for i in range(4) if use[i]] or [0]
            ks, lims = [keys[i] for i in chosen], [limits[i] for i in chosen]
            if op == "acquire":
                costs = [abs(amounts[i]) or 1 for i in chosen]
                got = await store.acquire(ks, lims, costs)
                want, new = check_all([mirror[k] for k in ks], clock.t, lims, costs)
                assert got == want
                mirror.update(zip(ks, new, strict=True))
            else:
                deltas = [amounts[i] for i in chosen]
                store.adjust(ks, lims, deltas)
                await store.flush()
                for k, lim, d in zip(ks, lims, deltas, strict=True):
                    mirror[k] = adjust(mirror[k], clock.t, d, lim)
        for k, lim in zip(keys, limits, strict=True):
            raw = await store.client.get(k)
            stored = None if raw is None else BucketState(*map(float, raw.split()))
            assert refill(stored, clock.t, lim).level == refill(mirror[k], clock.t, lim).level
    finally:
        await store.close()


async def test_two_gateways_share_one_bucket_atomically(prefix: str) -> None:
    """Two pools (as two gateways) race 300 requests at a 100/min bucket, on Redis' own clock."""
    a, b = buckets(), buckets()
    key = [f"{prefix}:{{tenant-1}}:rpm"]
    started = time.monotonic()
    results = await asyncio.gather(*(s.acquire(key, [100], [1]) for _ in range(150) for s in (a, b)))
    elapsed = time.monotonic() - started
    admitted = sum(d.allowed for d in results)
    assert 100 <= admitted <= 100 + 100 * elapsed / PERIOD_S + 1
    refused = [d for d in results if not d.allowed]
    assert refused and all(0 < d.retry_after_s <= 0.6 + 1e-6 for d in refused)
    await asyncio.gather(a.close(), b.close())


async def test_keys_names_ttl_and_values(prefix: str) -> None:
    store = buckets()
    limiter = RateLimiter(store, LimitSettings(redis_prefix=prefix))
    await limiter.start()
    p = principal(tenant_rpm_limit=60, rpm_limit=30, tenant_tpm_limit=6000, tpm_limit=600)
    adm = await limiter.admit(p, {}, "40", 10)
    assert adm is not None and adm.headers["x-ratelimit-remaining-tokens"] == "580"
    names = sorted([k.decode() async for k in store.client.scan_iter(match=f"{prefix}*")])
    assert names == sorted([f"{prefix}:{{tenant-1}}:rpm", f"{prefix}:{{tenant-1}}:tpm",
                            f"{prefix}:{{tenant-1}}:key:key-1:rpm", f"{prefix}:{{tenant-1}}:key:key-1:tpm"])
    ttl = await store.client.pttl(f"{prefix}:{{tenant-1}}:key:key-1:tpm")
    assert PERIOD_S * 1000 < ttl <= (2 + PERIOD_S) * 1000  # full again after 2 s, then one more period
    level, at = map(float, (await store.client.get(f"{prefix}:{{tenant-1}}:key:key-1:tpm")).split())
    assert level == 20 and abs(at - time.time()) < 5  # the server's clock, in seconds
    await limiter.close()


async def test_noscript_falls_back_to_eval(prefix: str) -> None:
    store = buckets(Clock(100.0))
    key = [f"{prefix}:{{t}}:tpm"]
    await store.client.script_flush()
    assert (await store.acquire(key, [1000], [100])).allowed  # EVALSHA -> NOSCRIPT -> EVAL
    assert await store.client.script_exists(_sha(store)) == [True]  # EVAL cached it again
    await store.client.script_flush()
    store.adjust(key, [1000], [-60])
    await store.flush()  # the pipelined EVALSHA -> NOSCRIPT -> EVAL
    assert (await store.client.get(key[0])).split()[0] == b"40"
    await store.close()


def _sha(store: RedisBuckets) -> str:
    from skyfleet.gateway.ratelimit_redis import _ACQUIRE

    return _ACQUIRE.sha


async def test_reconciliation_is_sent_in_the_background(prefix: str) -> None:
    store = buckets(Clock(500.0))
    limiter = RateLimiter(store, LimitSettings(redis_prefix=prefix, default_tenant_tpm=10_000))
    await limiter.start()
    key = f"{prefix}:{{tenant-1}}:tpm"
    adm = await limiter.admit(principal(), {}, "400", 50)
    assert adm is not None and adm.charged == (150.0,)
    for used in (42, 7):
        limiter.on_finish(RequestRecord(request_id="r", tenant_id="tenant-1", tenant_name="acme", key_id="key-1",
                                        model="m", route="chat", stream=False, status="completed", http_status=200,
                                        prompt_tokens=used, completion_tokens=0, admission=adm))
    deadline = time.monotonic() + 5
    while (await store.client.get(key)).split()[0] != b"49":
        assert time.monotonic() < deadline, "reconciliation never reached Redis"
        await asyncio.sleep(0.01)
    await limiter.close()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield int(s.getsockname()[1])
    s.close()


@pytest.mark.parametrize("where", ["closed", "blackhole"])
async def test_redis_down_allow_never_hangs_and_warns_once(where: str, closed_port: int, blackhole: int,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port if where == "closed" else blackhole
    registry = CollectorRegistry()
    store = RedisBuckets(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, max_connections=4)
    limiter = RateLimiter(store, LimitSettings(default_tenant_rpm=1), registry=registry)
    await limiter.start()
    caplog.set_level(logging.WARNING, logger="skyfleet.ratelimit")
    started = time.monotonic()
    results = [await limiter.admit(principal(), {}, None, 1) for _ in range(20)]
    took = time.monotonic() - started
    assert results == [None] * 20  # admitted, unchecked (no x-ratelimit headers to give)
    assert took < 0.2 + 0.5  # one bounded attempt, then Redis is left alone for a while
    assert registry.get_sample_value("skyfleet_ratelimit_unavailable_total", {"policy": "allow"}) == 20
    assert [r.message for r in caplog.records].count(
        "rate-limit store unreachable; applying limits.on_redis_error") == 1
    assert RETRY_AFTER_S >= 0.5
    await limiter.close()


async def test_redis_down_deny_is_a_503_not_a_500(closed_port: int) -> None:
    store = RedisBuckets(f"redis://127.0.0.1:{closed_port}/0", timeout_s=0.2, max_connections=4)
    limiter = RateLimiter(store, LimitSettings(default_tenant_rpm=100, on_redis_error="deny"))
    for _ in range(2):
        with pytest.raises(ServiceUnavailableError) as info:
            await limiter.admit(principal(), {}, None, 1)
        assert info.value.status == 503 and info.value.code == "rate_limiter_unavailable"
        assert info.value.headers["Retry-After"] == "1"
    await limiter.close()


async def test_redis_comes_back(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the retry pause the next request tries Redis again and is checked normally."""
    store = buckets()
    limiter = RateLimiter(store, LimitSettings(redis_prefix=prefix, default_tenant_rpm=5))
    real = store.client.evalsha
    calls = {"n": 0}

    async def flaky(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("refused")
        return await real(*args, **kw)

    monkeypatch.setattr(store.client, "evalsha", flaky)
    assert await limiter.admit(principal(), {}, None, 1) is None  # Redis "down": allowed unchecked
    assert await limiter.admit(principal(), {}, None, 1) is None  # within the pause: not even tried
    assert calls["n"] == 1
    deadline = time.monotonic() + RETRY_AFTER_S + 5
    while (adm := await limiter.admit(principal(), {}, None, 1)) is None:
        assert time.monotonic() < deadline, "Redis was never tried again"
        await asyncio.sleep(0.05)
    assert calls["n"] == 2 and adm.headers["x-ratelimit-remaining-requests"] == "4"
    await limiter.close()
