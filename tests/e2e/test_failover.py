"""Replica failure: kill -9 under load, a stream broken midway, restart, leaving routing fast."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest

from tests.e2e.harness import MODEL, Gateway, wait_until


def _by_id(gw: Gateway) -> dict[str, dict]:
    return {r["id"]: r for r in gw.replicas()}


async def test_kill_replica_under_20_concurrent_requests(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway
    client = gw.async_client(timeout=120)

    async def one(i: int) -> str:
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Write a short poem about the number {i}."}],
            max_tokens=48,
        )
        assert resp.choices[0].message.content
        return resp.choices[0].message.content

    tasks = [asyncio.create_task(one(i)) for i in range(20)]
    # Wait until both replicas hold work, then kill one of them.
    await asyncio.to_thread(
        wait_until, lambda: all(r["outstanding"] > 0 for r in gw.replicas()), 30, 0.02, "both replicas busy")
    victim = _by_id(gw)["local-0"]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    out_of_routing = await asyncio.to_thread(
        wait_until, lambda: _by_id(gw)["local-0"]["state"] != "ready", 5, 0.02, "victim out of routing")
    assert out_of_routing < 2.0
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], failures
    # Some requests really were moved to the other replica.
    assert gw.metric("skyfleet_upstream_retries_total") >= 1
    # The dead replica is restarted (new process) and comes back into routing.
    await asyncio.to_thread(
        wait_until,
        lambda: (r := _by_id(gw)["local-0"])["state"] == "ready" and r["pid"] != victim["pid"],
        60, 0.1, "replica restarted",
    )
    assert _by_id(gw)["local-0"]["restarts"] == 1
    assert time.monotonic() - killed_at < 60
    resp = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3)
    assert resp.choices[0].message.content is not None
    await client.close()


def test_stream_broken_midway_ends_with_error_event(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway
    stream = gw.client(timeout=60).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story about dragons."}],
        max_tokens=1000, stream=True, extra_body={"ignore_eos": True},
    )
    received = 0
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received == 5:
                busy = [r for r in gw.replicas() if r["outstanding"] > 0]
                assert len(busy) == 1
                os.kill(busy[0]["pid"], signal.SIGKILL)
    assert received >= 5
    assert "mid-stream" in str(info.value.message) or "engine" in str(info.value.message)
    # The gateway itself is fine, and the surviving replica serves.
    resp = gw.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3)
    assert resp.choices


def test_sigterm_drains_in_flight_stream_then_stops_replicas(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway
    pids = [r["pid"] for r in gw.replicas()]
    stream = gw.client(timeout=60).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe the sea at length."}],
        max_tokens=60, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    assert first is not None
    gw.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)  # the stream finishes despite the signal
    usage = rest[-1].usage
    assert usage is not None and usage.completion_tokens == 60
    assert gw.proc.wait(30) == 0
    for pid in pids:
        wait_until(lambda pid=pid: not _alive(pid), 10, what=f"replica {pid} to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
