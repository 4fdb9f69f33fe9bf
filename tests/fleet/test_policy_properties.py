"""Property tests of the default policy (the issue's acceptance): replicas always within [min, max] and the
schedule's bounds; at most one change of direction per cooldown; never down while requests wait beyond the
SLO; a restarted controller (state reloaded from its persisted form) decides exactly as before, and with
nothing observed yet changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import Decision
from skyfleet.fleet.policy.signals import WindowSnapshot
from skyfleet.fleet.spec import ModelFleet, parse_fleet_spec
from tests.fleet.sim import CATALOG, FleetSim, Load

T0 = datetime(2025, 6, 2, 21, 30, tzinfo=UTC).timestamp()
TYPES = [("g6e.xlarge", "us-east-1"), ("g5.xlarge", "us-east-2"), ("g6.xlarge", "us-west-2")]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def specs(draw: st.DrawFn, *, schedules: bool = True) -> ModelFleet:
    pools = []
    for i in range(draw(st.integers(1, 3))):
        lo = draw(st.integers(0, 2))
        itype, region = draw(st.sampled_from(TYPES))
        pools.append({"name": f"p{i}", "instance_type": itype, "region": region,
                      "tier": draw(st.sampled_from(["spot", "on-demand"])), "min": lo,
                      "max": lo + draw(st.integers(0, 4)),
                      "tokens_per_s": draw(st.sampled_from([None, 300.0, 1000.0]))})
    od_max = sum(p["max"] for p in pools if p["tier"] == "on-demand")
    total_max = sum(p["max"] for p in pools)
    down_util = draw(st.sampled_from([0.2, 0.5]))
    data: dict[str, Any] = {
        "pools": pools,
        "on_demand_floor": draw(st.integers(0, od_max)),
        "slo": {"ttft_p95_s": 0.5, "tpot_p95_s": 0.05},
        "scale_to_zero_after_s": draw(st.sampled_from([None, 20.0, 120.0])),
        "scaling": {"window_s": draw(st.sampled_from([10.0, 30.0])),
                    "up_stabilisation_s": draw(st.sampled_from([0.0, 10.0, 30.0])),
                    "down_stabilisation_s": draw(st.sampled_from([0.0, 20.0, 90.0])),
                    "cooldown_s": draw(st.sampled_from([0.0, 25.0, 60.0, 200.0])),
                    "max_step_up": draw(st.integers(1, 4)), "max_step_down": draw(st.integers(1, 3)),
                    "target_utilisation": draw(st.sampled_from([down_util, 0.7])),
                    "scale_down_utilisation": down_util},
    }
    if schedules and draw(st.booleans()):
        scheds = []
        for _ in range(draw(st.integers(1, 2))):
            smax = draw(st.integers(0, total_max))
            scheds.append({"cron": f"{draw(st.sampled_from([0, 15, 30, 45]))} {draw(st.sampled_from([21, 22]))} * * *",
                           "timezone": draw(st.sampled_from(["UTC", "Europe/London"])),
                           "min": draw(st.integers(0, smax)), "max": smax,
                           "duration_s": draw(st.sampled_from([None, 600.0]))})
        data["schedules"] = scheds
    return parse_fleet_spec({"models": {"m": data}}).models["m"]


loads = st.lists(st.tuples(
    st.sampled_from([1.0, 5.0, 10.0, 30.0]),
    st.builds(Load, demand_tps=st.sampled_from([0.0, 0.0, 100.0, 900.0, 3000.0, 9000.0]),
              queue=st.sampled_from([0, 0, 0, 2]), ttft_s=st.sampled_from([0.04, 0.04, 2.0]),
              tpot_s=st.sampled_from([0.02, 0.02, 0.2]))), min_size=1, max_size=45)


def initial(draw: st.DrawFn, spec: ModelFleet) -> dict[str, int]:
    return {p.name: draw(st.integers(0, p.max)) for p in spec.pools}


def run(spec: ModelFleet, start: dict[str, int], steps: list[tuple[float, Load]]) -> FleetSim:
    sim = FleetSim(spec, T0, replicas=start)
    for dt, load in steps:
        sim.step(load, dt)
    return sim


def pressure(spec: ModelFleet, d: Decision) -> bool:
    i = d.inputs
    return bool((i["waiting_mean"] or 0) + (i["queue_mean"] or 0) > 0 or (i["queue_latest"] or 0) > 0
                or (i["ttft_p95_s"] is not None and i["ttft_p95_s"] > spec.slo.ttft_p95_s)
                or (i["tpot_p95_s"] is not None and i["tpot_p95_s"] > spec.slo.tpot_p95_s))


@SETTINGS
@given(st.data())
def test_replicas_stay_within_pool_and_schedule_bounds(data: st.DataObject) -> None:
    spec = data.draw(specs())
    sim = run(spec, initial(data.draw, spec), data.draw(loads))
    for s in sim.steps:
        d = s.decision
        lo, hi = spec.bounds(s.at)
        scheduled = spec.active_schedule(s.at) is not None
        assert set(d.desired) == {p.name for p in spec.pools}
        for p in spec.pools:
            pool_min = 0 if scheduled or d.total == 0 else p.min
            assert pool_min <= d.desired[p.name] <= p.max, (p.name, d)
        assert d.total <= hi
        if d.total == 0:
            # Zero only when the bounds allow none, or asleep / going to sleep with scale-to-zero.
            assert hi == 0 or spec.scale_to_zero_after_s is not None, d
        else:
            assert d.total >= min(max(lo, 1), hi), d
        # The on-demand floor holds whenever the pools' minimums leave room for it.
        on_demand = sum(n for name, n in d.desired.items() if spec.pool(name).tier == "on-demand")
        spot_pinned = sum(p.min for p in spec.pools if p.tier == "spot") if not scheduled else 0
        assert on_demand >= min(spec.on_demand_floor, d.total - spot_pinned), d


@SETTINGS
@given(st.data())
def test_at_most_one_direction_change_per_cooldown(data: st.DataObject) -> None:
    spec = data.draw(specs(schedules=False))
    sim = run(spec, initial(data.draw, spec), data.draw(loads))
    last: tuple[float, int] | None = None  # (time, direction) of the last change
    for s in sim.steps[1:]:
        before, after = sum(s.before.values()), s.decision.total
        if after == before:
            continue
        direction = 1 if after > before else -1
        wake = before == 0 and "wake from zero" in s.decision.reason
        if last is not None and direction != last[1] and not wake:
            assert s.at - last[0] >= spec.scaling.cooldown_s, (last, s)
        last = (s.at, direction)


@SETTINGS
@given(st.data())
def test_never_scales_down_while_requests_wait_beyond_the_slo(data: st.DataObject) -> None:
    spec = data.draw(specs())
    sim = run(spec, initial(data.draw, spec), data.draw(loads))
    for s in sim.steps[1:]:
        before = sum(s.before.values())
        _, hi = spec.bounds(s.at)
        if pressure(spec, s.decision) and before <= hi:
            assert s.decision.total >= before, s


@SETTINGS
@given(st.data())
def test_a_restart_reloading_the_persisted_state_changes_nothing(data: st.DataObject) -> None:
    spec = data.draw(specs())
    start = initial(data.draw, spec)
    steps = data.draw(loads)
    restart_at = data.draw(st.integers(0, len(steps) - 1))
    continuous = run(spec, start, steps)
    restarted = FleetSim(spec, T0, replicas=start)
    for i, (dt, load) in enumerate(steps):
        if i == restart_at:
            restarted.restart()
        restarted.step(load, dt)
    assert [s.decision for s in restarted.steps] == [s.decision for s in continuous.steps]
    assert restarted.state == continuous.state
    # Restarted with nothing observed yet (the window is in memory): no change, unless the bounds moved.
    restarted.restart()
    now = restarted.now + 1
    prev = dict(restarted.state.desired or {})
    n = sum(prev.values())
    lo, hi = spec.bounds(now)
    same_window = spec.active_schedule(now) == spec.active_schedule(restarted.now)
    asleep = n == 0 and spec.scale_to_zero_after_s is not None
    if same_window and (asleep or min(max(lo, 1), hi) <= n <= hi):
        d, _ = load_policy("default").decide(spec, WindowSnapshot(()), CATALOG, now, restarted.state)
        assert d.desired == prev and d.drain == () and d.direction == 0, d
