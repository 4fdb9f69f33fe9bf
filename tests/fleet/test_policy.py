"""The default policy on golden scenarios: ramp up, ramp down to min, to zero and back, a night schedule,
spot above the on-demand floor, draining the least loaded, a restart."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import pytest

from skyfleet.config import ConfigError
from skyfleet.fleet.policy import load_policy, policy_names
from skyfleet.fleet.policy.base import Decision, PolicyState, StateError
from skyfleet.fleet.policy.default import RankedPool, allocate, rank_pools
from skyfleet.fleet.policy.signals import ReplicaSample, SignalWindow, WindowSnapshot
from skyfleet.fleet.spec import ModelFleet, parse_fleet_spec
from tests.fleet.sim import CATALOG, FleetSim, Load

T0 = datetime(2025, 6, 2, 12, 0, tzinfo=UTC).timestamp()  # a Monday, noon UTC


def model(**over: Any) -> ModelFleet:
    data: dict[str, Any] = {
        "on_demand_floor": 1,
        "pools": [
            {"name": "spot", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "spot", "max": 6,
             "tokens_per_s": 1000},
            {"name": "od", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "on-demand", "min": 1,
             "max": 4, "tokens_per_s": 1000},
        ],
        "scaling": {"window_s": 30, "up_stabilisation_s": 30, "down_stabilisation_s": 120, "cooldown_s": 60,
                    "max_step_up": 4, "max_step_down": 1},
    }
    data.update(over)
    return parse_fleet_spec({"models": {"m": data}}).models["m"]


def test_policies_are_looked_up_by_name() -> None:
    assert policy_names() == ["default"]
    assert load_policy("default").name == "default"
    with pytest.raises(ConfigError, match="unknown fleet policy 'nope'; known: default"):
        load_policy("nope")


def test_ramp_up_waits_for_the_stabilisation_window_then_steps_within_bounds() -> None:
    sim = FleetSim(model(), T0, replicas={"od": 1})
    for _ in range(3):
        sim.step(Load(demand_tps=300))
    assert sim.totals() == [1, 1, 1]
    first_up = None
    for i in range(40):
        d = sim.step(Load(demand_tps=5000))
        if d.direction > 0 and first_up is None:
            first_up = i
            assert "need more for 30 s" in d.reason
    # The need must hold 30 s (3 ticks of 10 s) before the first step: ticks 0..2 see it, the 4th acts.
    assert first_up == 3
    totals = sim.totals()
    assert all(b - a <= 4 for a, b in pairwise(totals))
    assert totals == sorted(totals)  # never down while requests wait
    # 5000 tok/s at 70% of 1000 tok/s per replica -> 8 replicas: the floor on-demand, the 6 spot, then the
    # on-demand pool as the fallback for the full spot pool.
    assert totals[-1] == 8 and sim.counts() == {"spot": 6, "od": 2}
    # Sustained: once sized, the fleet holds (utilisation 5000/8000 is between 0.5 and 0.7).
    assert totals[-5:] == [8] * 5 and sim.steps[-1].decision.reason.startswith("hold 8: stable")


def test_ramp_down_to_min_one_step_at_a_time_after_the_down_window() -> None:
    sim = FleetSim(model(), T0, replicas={"spot": 6, "od": 2})
    for _ in range(6):
        sim.step(Load(demand_tps=5000))
    assert sim.totals()[-1] == 8
    for _ in range(30):
        sim.step(Load(demand_tps=0))
    totals = sim.totals()[6:]
    # 120 s of "need fewer" (12 ticks) before the first step down; then one replica per decision.
    assert totals[:12] == [8] * 12 and totals[12] == 7
    assert all(a - b in (0, 1) for a, b in pairwise(totals))
    assert totals[-1] == 1 and sim.counts() == {"spot": 0, "od": 1}  # the pool minimum, on-demand
    # The on-demand fallback went first, then the spot replicas.
    first_down = sim.steps[6 + 12].decision
    assert first_down.desired == {"spot": 6, "od": 1} and len(first_down.drain) == 1
    assert first_down.drain[0].startswith("od-")


def test_scale_to_zero_after_the_idle_period_and_wake_on_a_queued_request() -> None:
    spec = model(scale_to_zero_after_s=300, pools=[
        {"name": "od", "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "on-demand", "min": 1,
         "max": 3, "tokens_per_s": 500}])
    sim = FleetSim(spec, T0, replicas={"od": 1})
    sim.step(Load(demand_tps=200))
    zero_at = None
    for i in range(40):
        d = sim.step(Load())
        if d.total == 0 and zero_at is None:
            zero_at = i
            assert "scale to zero" in d.reason and d.drain == ("od-1",)
    # Idle once the signal window (30 s) holds no activity, i.e. from the third idle tick; 300 s later it goes.
    assert zero_at == 2 + 30
    assert sim.totals()[-1] == 0 and sim.replicas == {}
    sim.step(Load())
    assert sim.totals()[-1] == 0 and "asleep" in sim.steps[-1].decision.reason
    d = sim.step(Load(demand_tps=100))  # a request arrives: it waits in the gateway's queue
    assert d.total == 1 and d.direction == 1 and "wake from zero: 1 request(s) queued" in d.reason


def test_without_scale_to_zero_the_fleet_never_goes_below_one() -> None:
    spec = model(on_demand_floor=0, pools=[
        {"name": "od", "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "on-demand", "min": 0,
         "max": 3, "tokens_per_s": 500}])
    sim = FleetSim(spec, T0, replicas={"od": 3})
    for _ in range(60):
        sim.step(Load())
    assert min(sim.totals()) == 1


def test_a_night_schedule_caps_the_fleet_even_under_load_and_the_morning_raises_it() -> None:
    spec = model(schedules=[
        {"cron": "0 22 * * *", "timezone": "UTC", "min": 0, "max": 2},
        {"cron": "0 6 * * *", "timezone": "UTC", "min": 3, "max": 10},
    ])
    start = datetime(2025, 6, 2, 21, 58, tzinfo=UTC).timestamp()
    sim = FleetSim(spec, start, replicas={"spot": 5, "od": 2})
    for _ in range(11):  # to 21:59:50
        sim.step(Load(demand_tps=5000))
    assert sim.totals()[-1] >= 7
    d = sim.step(Load(demand_tps=5000))  # 22:00:00
    assert d.total == 2 and d.desired == {"spot": 1, "od": 1} and "bounds [0, 2]" in d.reason
    assert len(d.drain) == 5 + 1  # 4 spot, 1 on-demand above the pool minimum
    for _ in range(20):
        assert sim.step(Load(demand_tps=5000)).total == 2  # waits, but the schedule's max wins
    sim.now = datetime(2025, 6, 3, 5, 59, 55, tzinfo=UTC).timestamp()
    d = sim.step(Load(), dt=5)  # 06:00:00, no load at all
    assert d.total == 3 and "bounds [3, 10]" in d.reason


def test_allocation_puts_the_floor_on_demand_and_the_rest_on_spot_first() -> None:
    pools = [RankedPool("cheap-spot", "spot", 0, 2, 0.4, None, None),
             RankedPool("dear-spot", "spot", 0, 2, 0.8, None, None),
             RankedPool("od", "on-demand", 0, 3, 1.0, None, None),
             RankedPool("dear-od", "on-demand", 0, 3, 2.0, None, None)]
    prev: dict[str, int] = {}
    seen = []
    for total in range(0, 10):
        prev = allocate(pools, total, 2, prev, enforce_pool_min=True)
        seen.append(tuple(prev.values()))
    assert seen == [(0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 2, 0), (1, 0, 2, 0), (2, 0, 2, 0), (2, 1, 2, 0),
                    (2, 2, 2, 0), (2, 2, 3, 0), (2, 2, 3, 1), (2, 2, 3, 2)]
    # Down: the reverse (on-demand fallback first, dearest first; then spot, dearest first; then the floor).
    back = []
    for total in range(9, -1, -1):
        prev = allocate(pools, total, 2, prev, enforce_pool_min=True)
        back.append(tuple(prev.values()))
    assert back[::-1] == seen
    # Pool minimums beat the floor; the floor moves spot replicas when it can.
    assert allocate(pools, 2, 2, {"cheap-spot": 2}, enforce_pool_min=True) == \
        {"cheap-spot": 0, "dear-spot": 0, "od": 2, "dear-od": 0}
    pinned = [RankedPool("s", "spot", 2, 2, 0.4, None, None), RankedPool("o", "on-demand", 0, 2, 1.0, None, None)]
    assert allocate(pinned, 2, 1, {}, enforce_pool_min=True) == {"s": 2, "o": 0}


def test_pools_rank_by_dollars_per_served_token() -> None:
    spec = model(pools=[
        {"name": "l40s", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "spot", "max": 2,
         "tokens_per_s": 3000},
        {"name": "a10g", "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "spot", "max": 2,
         "tokens_per_s": 500},
        {"name": "od", "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "on-demand", "max": 2}])
    ranked = rank_pools(spec, CATALOG)
    # The on-demand pool has no rate (nominal or observed): all rank by $/hour alone (0.4028, 0.8171, 1.006).
    assert [r.name for r in ranked] == ["a10g", "l40s", "od"]
    # With a rate everywhere, by $ per token: g6e spot 0.8171 $/h / 3000 tok/s beats g5 spot 0.4028 / 500.
    spec2 = model(pools=[p.model_dump() | {"tokens_per_s": p.tokens_per_s or 400} for p in spec.pools])
    assert [r.name for r in rank_pools(spec2, CATALOG)] == ["l40s", "a10g", "od"]


def test_drain_picks_the_least_loaded_replicas_of_a_shrinking_pool() -> None:
    spec = model(scaling={"window_s": 30, "down_stabilisation_s": 0, "cooldown_s": 0, "max_step_down": 2})
    w = SignalWindow()
    for rid, running in [("od-1", 1.0), ("spot-a", 5.0), ("spot-b", 0.5), ("spot-c", 2.0)]:
        pool = rid.split("-")[0]
        w.add(ReplicaSample(T0 - 10, rid, pool, running=running, waiting=0, generation_tokens_total=0))
        w.add(ReplicaSample(T0, rid, pool, running=running, waiting=0, generation_tokens_total=100))
    state = PolicyState(desired={"spot": 3, "od": 1}, history=((T0 - 100, 1),))
    d, _ = load_policy("default").decide(spec, w.snapshot(T0), CATALOG, T0, state)
    assert d.desired == {"spot": 1, "od": 1} and d.drain == ("spot-b", "spot-c")


def test_a_restart_with_an_empty_window_changes_nothing() -> None:
    sim = FleetSim(model(), T0, replicas={"od": 1})
    for _ in range(12):
        sim.step(Load(demand_tps=5000))
    before = dict(sim.state.desired or {})
    sim.restart()
    d, _ = load_policy("default").decide(sim.spec, WindowSnapshot(()), CATALOG, sim.now + 10, sim.state)
    assert d.desired == before and d.direction == 0 and d.drain == ()


def test_policy_state_round_trips_and_rejects_damage() -> None:
    s = PolicyState(desired={"a": 2}, history=((1.5, 2), (2.0, 3)), last_change_at=1.0, last_direction=-1,
                    idle_since=None)
    assert PolicyState.from_json(s.to_json()) == s
    assert PolicyState.from_json(PolicyState().to_json()) == PolicyState()
    for bad in [{}, {**s.to_json(), "version": 99}, {**s.to_json(), "history": [[1, -1]]},
                {**s.to_json(), "last_direction": 2}, {**s.to_json(), "desired": {"a": "2"}},
                {**s.to_json(), "idle_since": float("nan")}]:
        with pytest.raises(StateError):
            PolicyState.from_json(bad)


def test_decision_json_and_inputs_are_numbers() -> None:
    sim = FleetSim(model(), T0, replicas={"od": 1})
    d = sim.step(Load(demand_tps=100))
    assert isinstance(d, Decision)
    assert d.to_json() == {"desired": {"od": 1, "spot": 0}, "drain": [], "reason": d.reason, "direction": 0}
    assert all(v is None or isinstance(v, int | float) for v in d.inputs.values())


def test_latency_above_the_slo_alone_scales_up_and_blocks_scaling_down() -> None:
    spec = model(scaling={"window_s": 30, "up_stabilisation_s": 20, "down_stabilisation_s": 20, "cooldown_s": 0})
    sim = FleetSim(spec, T0, replicas={"spot": 2, "od": 1})
    # Little traffic (utilisation 10%) but TTFT p95 above the SLO (2 s): no queue, yet more replicas.
    for _ in range(6):
        sim.step(Load(demand_tps=300, ttft_s=5.0))
    assert sim.totals()[-1] > 3 and all(t >= 3 for t in sim.totals())
    assert "TTFT p95" in sim.steps[-1].decision.reason
    n = sim.totals()[-1]
    sim.step(Load(demand_tps=300, tpot_s=0.5))  # TPOT too: never down while it is breached
    assert sim.totals()[-1] >= n
