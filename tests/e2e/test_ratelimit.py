"""Rate limits on real gateways (`skyfleet serve`, llama.cpp): one gateway with in-process buckets, and
two gateways sharing one PostgreSQL database and one Redis, each admitting a share of one tenant's limit."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.harness import (
    MODEL,
    REDIS_URL,
    Gateway,
    drop_redis_keys,
    redis_keys,
    start_gateway,
    wait_until,
)

LIMIT = 60  # requests per minute: refills one per second


async def _burst(gateways: list[Gateway], key: str, total: int) -> tuple[list[httpx.Response], float]:
    """``total`` tiny completions fired at once, spread over ``gateways``; (responses, seconds it took)."""
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    clients = [httpx.AsyncClient(base_url=gw.url, timeout=120, limits=limits) for gw in gateways]
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        started = time.monotonic()
        responses = await asyncio.gather(*(
            clients[i % len(clients)].post("/v1/completions", json=body, headers=headers) for i in range(total)))
        return list(responses), time.monotonic() - started
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def _check_burst(responses: list[httpx.Response], took: float, before: int) -> int:
    """The admitted count is the limit (within 5 %) and never above limit + the refill during the burst."""
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    admitted = before + codes.count(200)
    assert admitted <= LIMIT * (1 + took / 60) + 1, (admitted, took)
    assert abs(admitted - LIMIT) <= 0.05 * LIMIT, (admitted, took)
    for r in responses:
        if r.status_code == 429:
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("requests", "rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-limit-requests"] == str(LIMIT)
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
        else:
            assert r.json()["choices"]
            assert r.headers["x-ratelimit-limit-requests"] == str(LIMIT)
    return admitted


def test_one_gateway_in_process_limits(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, replicas=1, local__threads="1", limits__default_tenant_rpm=str(LIMIT),
                       limits__default_tenant_tpm="1000000")
    try:
        wait_until(lambda: "API key" in gw.keys, 10, what="bootstrap keys on stdout")
        client = gw.client()
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == str(LIMIT)
        assert raw.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 1)
        assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True) as stream_raw:
            assert stream_raw.headers["x-ratelimit-limit-requests"] == str(LIMIT)
            assert int(stream_raw.headers["x-ratelimit-remaining-requests"]) <= LIMIT - 2
            assert list(stream_raw.parse())
        responses, took = asyncio.run(_burst([gw], gw.member_key, 150))
        _check_burst(responses, took, before=2)
        # The bucket refills one request a second, so one may have come back since the burst.
        for _ in range(5):
            try:
                client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
            except openai.RateLimitError as exc:
                err = exc
                break
        else:
            pytest.fail("the SDK never saw a RateLimitError")
        assert err.code == "rate_limit_exceeded" and err.type == "requests"
        assert 1 <= int(err.response.headers["retry-after"]) <= 2
        assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert err.response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert gw.metric("skyfleet_ratelimited_requests_total", kind="requests") >= 1
    finally:
        gw.stop()


def test_two_gateways_share_one_tenant_limit_through_redis(tmp_path: Path, pg_database_url: str) -> None:
    prefix = "e2e-rl-" + secrets.token_hex(4)
    shared = {"database_url": pg_database_url, "redis_url": REDIS_URL, "limits__redis_prefix": prefix,
              "local__threads": "1"}
    a = start_gateway(tmp_path / "a", replicas=1, **shared)
    b = None
    try:
        b = start_gateway(tmp_path / "b", replicas=1, bootstrap="false", **shared)
        wait_until(lambda: "API key" in a.keys, 10, what="bootstrap keys on stdout")
        r = a.admin("PATCH", "/admin/v1/tenants/default", json={"rpm_limit": LIMIT})
        assert r.status_code == 200 and r.json()["rpm_limit"] == LIMIT, r.text
        responses, took = asyncio.run(_burst([a, b], a.member_key, 150))
        # Each gateway decided on 75 requests: with buckets of their own they would have admitted
        # about 120 together, not one limit's worth (checked above).
        _check_burst(responses, took, before=0)
        assert [len(responses[i::2]) for i in (0, 1)] == [75, 75]
        for gw in (a, b):
            assert gw.metric("skyfleet_ratelimit_unavailable_total", key=a.admin_key) == 0
        assert redis_keys(prefix), "the limiter never wrote to Redis"
    finally:
        if b is not None:
            b.stop()
        a.stop()
        drop_redis_keys(prefix)
