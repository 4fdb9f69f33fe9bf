"""The fleet controller end to end: `skyfleet serve` with a fleet spec of local pools and real llama.cpp replicas.

* A load ramp 0 -> high -> 0: the model wakes from zero for a request (which waits in the cold-start queue),
  scales up under load within its stabilisation window, and back down to zero when idle; no request fails.
* A preemption drill under load: a spot replica gets a notice while conversations run through it; it leaves
  routing at once, its in-flight requests finish, no turn is lost, and, the spot pool having no capacity, the
  replacement starts in the on-demand pool.
* A replica that cannot start: requests get 503 + Retry-After after the cold-start limit, and the failure is
  shown in the fleet status.
* A bad fleet spec stops `skyfleet serve` with the field named.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.e2e.harness import MODEL, Gateway, start_gateway, wait_until

pytestmark = pytest.mark.e2e


def write_spec(path: Path, model: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"models": {MODEL: model}}))
    return path


def fleet(gw: Gateway) -> dict[str, Any]:
    r = gw.admin("GET", "/admin/v1/fleet")
    r.raise_for_status()
    return r.json()["models"][0]  # type: ignore[no-any-return]


def pool(gw: Gateway, name: str) -> dict[str, Any]:
    return next(p for p in fleet(gw)["pools"] if p["pool"] == name)


def total(status: dict[str, Any], state: str = "ready") -> int:
    return sum(1 for p in status["pools"] for r in p["replicas"] if r["state"] == state)


def start(tmp_path: Path, spec: Path, **settings: str) -> Gateway:
    return start_gateway(tmp_path, replicas=1, fleet_spec=str(spec), fleet__interval_s="1", local__threads="1",
                         health_interval_s="0.25", **settings)


RAMP = {
    "scale_to_zero_after_s": 6,
    "slo": {"ttft_p95_s": 5.0, "tpot_p95_s": 0.5},
    "scaling": {"window_s": 4, "up_stabilisation_s": 2, "down_stabilisation_s": 4, "cooldown_s": 3,
                "max_step_up": 2, "max_step_down": 1},
    "pools": [
        {"name": "spot", "instance_type": "local", "region": "local", "tier": "spot", "min": 0, "max": 2},
        {"name": "od", "instance_type": "local", "region": "local", "tier": "on-demand", "min": 0, "max": 1},
    ],
}


async def _chat_load(gw: Gateway, workers: int, stop: asyncio.Event, failures: list[str], done: list[int]) -> None:
    client = gw.async_client(timeout=120)

    async def worker(i: int) -> None:
        while not stop.is_set():
            try:
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"Count to twenty, worker {i}."}],
                    max_tokens=48, stream=True)
                async for _ in stream:
                    pass
                done[0] += 1
            except openai.APIError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker(i) for i in range(workers)))
    await client.close()


def test_load_ramp_scales_up_then_to_zero_and_wakes(tmp_path: Path) -> None:
    gw = start(tmp_path, write_spec(tmp_path / "fleet.yaml", RAMP))
    try:
        # idle: down to zero replicas after scale_to_zero_after_s
        wait_until(lambda: total(fleet(gw), "ready") == 0 and total(fleet(gw), "draining") == 0, 60, 0.2,
                   "scale to zero")
        # a request at zero waits for a cold start, then succeeds
        t0 = time.monotonic()
        reply = gw.client(timeout=120).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        cold_request_s = time.monotonic() - t0
        assert reply.choices[0].message.content is not None
        spot = pool(gw, "spot")
        assert spot["cold_start_s"]["count"] >= 2  # the first start and this wake-up
        assert 0 < spot["cold_start_s"]["last"] <= cold_request_s

        # high load: more streams than one replica's slots -> scale up within the stabilisation window
        failures: list[str] = []
        done = [0]
        peak = [0]

        async def ramp() -> float:
            stop = asyncio.Event()
            load = asyncio.create_task(_chat_load(gw, 10, stop, failures, done))
            started = time.monotonic()
            try:
                while time.monotonic() - started < 90:
                    n = await asyncio.to_thread(lambda: total(fleet(gw), "ready"))
                    peak[0] = max(peak[0], n)
                    if n >= 2:
                        return time.monotonic() - started
                    await asyncio.sleep(0.25)
                raise AssertionError(f"no scale-up under load: {fleet(gw)['reason']}")
            finally:
                stop.set()
                await load

        scale_up_s = asyncio.run(ramp())
        assert peak[0] >= 2
        assert done[0] > 0
        # and back to zero once the load is gone
        wait_until(lambda: total(fleet(gw), "ready") == 0 and total(fleet(gw), "draining") == 0, 90, 0.25,
                   "scale back to zero")
        assert failures == []
        history = gw.admin("GET", "/admin/v1/fleet/history?limit=1000").json()["data"]
        reasons = [d["reason"] for d in history]
        assert any("wake from zero" in r for r in reasons)
        assert any("scale to zero" in r for r in reasons)
        assert any("need more" in r for r in reasons)
        print(json.dumps({"cold_request_s": round(cold_request_s, 2), "scale_up_s": round(scale_up_s, 2),
                          "requests": done[0], "cold_start_s": spot["cold_start_s"]}))
        # the same through the CLI
        out = gw.cli("fleet", "history", "--url", gw.url, "--api-key", gw.admin_key, "--limit", "5").stdout
        assert len(out.strip().splitlines()) == 5
        status = gw.cli("fleet", "status", "--url", gw.url, "--api-key", gw.admin_key, "--format", "json").stdout
        assert json.loads(status)["models"][0]["pools"][0]["pool"] == "spot"
        denied = gw.cli("fleet", "status", "--url", gw.url, "--api-key", gw.member_key, check=False)
        assert denied.returncode == 1 and "permission" in denied.stderr.lower()
    finally:
        gw.stop()


DRILL = {
    "slo": {"ttft_p95_s": 5.0, "tpot_p95_s": 0.5},
    "scaling": {"window_s": 4, "up_stabilisation_s": 60, "down_stabilisation_s": 300, "cooldown_s": 3},
    "pools": [
        {"name": "spot", "instance_type": "local", "region": "local", "tier": "spot", "min": 2, "max": 2},
        {"name": "od", "instance_type": "local", "region": "local", "tier": "on-demand", "min": 0, "max": 1},
    ],
}


def test_preemption_drill_under_load(tmp_path: Path) -> None:
    gw = start(tmp_path, write_spec(tmp_path / "fleet.yaml", DRILL))
    try:
        wait_until(lambda: gw.ready(2), 60, 0.1, "two spot replicas")
        turns, conversations = 5, 4
        failures: list[str] = []
        timings: dict[str, float] = {}

        async def drill() -> list[str]:
            client = gw.async_client(timeout=120)
            convs = [(await client.conversations.create()).id for _ in range(conversations)]
            preempt_at = asyncio.Event()
            completed = [0]

            async def talk(conv: str, i: int) -> None:
                for t in range(turns):
                    try:
                        if (i + t) % 2:
                            stream = await client.responses.create(
                                model=MODEL, conversation=conv, input=f"Turn {t}: name a colour.",
                                max_output_tokens=16, stream=True)
                            async for _ in stream:
                                pass
                        else:
                            await client.responses.create(model=MODEL, conversation=conv,
                                                          input=f"Turn {t}: name a fruit.", max_output_tokens=16)
                    except openai.APIError as exc:
                        failures.append(f"turn {t} of {conv}: {type(exc).__name__}: {exc}")
                    completed[0] += 1
                    if completed[0] == conversations:  # every conversation has a turn in flight or done
                        preempt_at.set()

            async def preempt() -> None:
                await preempt_at.wait()
                t0 = time.monotonic()
                r = await asyncio.to_thread(gw.admin, "POST", "/admin/v1/fleet/preempt",
                                            json={"replica": "spot-0", "notice_s": 10, "capacity_gone_s": 300})
                assert r.status_code == 200, r.text

                def out_of_routing() -> bool:
                    return next(x for x in gw.replicas() if x["id"] == "spot-0")["state"] != "ready"

                await asyncio.to_thread(wait_until, out_of_routing, 1.0, 0.02, "spot-0 out of routing")
                timings["out_of_routing_s"] = time.monotonic() - t0

            await asyncio.gather(*(talk(c, i) for i, c in enumerate(convs)), preempt())
            await client.close()
            return convs

        convs = asyncio.run(drill())
        assert failures == []
        assert timings["out_of_routing_s"] <= 1.0
        # no lost turn: every conversation holds each turn's input and output
        client = gw.client()
        for conv in convs:
            items = client.conversations.items.list(conv, limit=100).data
            roles = [getattr(it, "role", None) for it in items]
            assert roles.count("user") == turns and roles.count("assistant") == turns, roles
        # the replacement: no spot capacity, so the on-demand fallback pool starts one
        wait_until(lambda: pool(gw, "od")["ready"] == 1, 60, 0.2, "on-demand replacement")
        wait_until(lambda: all(r["id"] != "spot-0" or r["state"] != "ready" for r in gw.replicas()), 30, 0.2,
                   "spot-0 gone")
        spot = pool(gw, "spot")
        assert spot["preemptions"] == 1 and spot["no_capacity"] is True
        history = gw.admin("GET", "/admin/v1/fleet/history?limit=1000").json()["data"]
        assert any("preempted" in d["reason"] and "spot-0" in d["reason"] for d in history)
        print(json.dumps(timings))
    finally:
        gw.stop()


def test_replica_that_cannot_start_gets_503_after_the_cold_start_limit(tmp_path: Path) -> None:
    spec = {**RAMP, "scale_to_zero_after_s": None, "engine_args": {"ctx_size": 1}}  # refused by `engine llama`
    gw = start_gateway(tmp_path, replicas=0, min_ready=0, fleet_spec=str(write_spec(tmp_path / "fleet.yaml", spec)),
                       fleet__interval_s="1", fleet__cold_start_max_wait_s="2")
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            gw.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4)
        waited = time.monotonic() - t0
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"].isdigit()
        assert info.value.body["code"] == "no_replica_available"  # type: ignore[index]
        assert 2.0 <= waited < 10
        spot = pool(gw, "spot")
        assert any("exited" in r["detail"] for r in spot["replicas"]), spot
        assert gw.metric("skyfleet_cold_start_wait_seconds_count", outcome="timed_out") >= 1
    finally:
        gw.stop()


def test_bad_fleet_spec_stops_serve_with_the_field_named(tmp_path: Path) -> None:
    bad = {**RAMP, "pools": [{"name": "spot", "instance_type": "local", "region": "local", "tier": "spot",
                              "min": 3, "max": 2}]}
    spec = write_spec(tmp_path / "fleet.yaml", bad)
    env = {"SKYFLEET_DATA_DIR": str(tmp_path / "d"), "SKYFLEET_FLEET_SPEC": str(spec), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "skyfleet", "serve", "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert f"models.{MODEL}.pools[0]" in proc.stderr and "min (3) is above max (2)" in proc.stderr


SIM_PROFILE = {"ttft_base_s": 0.02, "prefill_tokens_per_s": 20000, "tpot_base_s": 0.01, "tpot_batch_slope": 0.05,
               "max_num_seqs": 4, "ignore_eos": True}


def test_a_larger_simulated_fleet_follows_a_load_ramp(tmp_path: Path) -> None:
    """Eight-replica pools of the simulated engine (vLLM-named metrics, 4 sequences each): 0 -> 32 streams -> 0."""
    profile = tmp_path / "sim.yaml"
    profile.write_text(yaml.safe_dump(SIM_PROFILE))
    spec = {
        "engine": "sim", "engine_args": {"profile": str(profile)}, "on_demand_floor": 1,
        "slo": {"ttft_p95_s": 1.0, "tpot_p95_s": 0.1},
        "scaling": {"window_s": 3, "up_stabilisation_s": 1, "down_stabilisation_s": 3, "cooldown_s": 2,
                    "max_step_up": 4, "max_step_down": 2},
        "pools": [
            {"name": "od", "instance_type": "local", "region": "local", "tier": "on-demand", "min": 1, "max": 2},
            {"name": "spot", "instance_type": "local", "region": "local", "tier": "spot", "min": 0, "max": 6},
        ],
    }
    gw = start(tmp_path, write_spec(tmp_path / "fleet.yaml", spec))
    try:
        failures: list[str] = []
        done = [0]

        async def ramp() -> int:
            stop = asyncio.Event()
            load = asyncio.create_task(_chat_load(gw, 32, stop, failures, done))
            peak, started = 0, time.monotonic()
            try:
                while time.monotonic() - started < 60 and peak < 6:
                    peak = max(peak, await asyncio.to_thread(lambda: total(fleet(gw), "ready")))
                    await asyncio.sleep(0.25)
            finally:
                stop.set()
                await load
            return peak

        peak = asyncio.run(ramp())
        assert peak >= 6, fleet(gw)["reason"]
        status = fleet(gw)
        assert pool(gw, "od")["ready"] >= 1  # the on-demand floor
        assert pool(gw, "spot")["desired"] >= 4  # the rest on the cheaper spot pool
        wait_until(lambda: total(fleet(gw), "ready") == 1 and total(fleet(gw), "draining") == 0, 90, 0.25,
                   "back to the minimum")
        assert pool(gw, "od")["ready"] == 1  # the floor stays; spot went first
        assert failures == [] and done[0] > 0
        print(json.dumps({"peak_ready": peak, "requests": done[0], "usd_per_hour_at_peak": status["usd_per_hour"]}))
    finally:
        gw.stop()
