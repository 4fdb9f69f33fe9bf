"""The planner's integer program: hand-solved golden cases, properties (demand always met, never dearer than
any single option, optimal against brute force), peak demand per window, options from the catalog, the
fleet spec mapping, and the solve time on the real Azure conversation trace."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.cost.catalog import Catalog, InstanceType
from skyfleet.fleet.spec import Slo, parse_fleet_spec
from skyfleet.planner.capacity import ReplicaCapacity
from skyfleet.planner.milp import (
    Option,
    PlanError,
    WindowDemand,
    demand_windows,
    options_for,
    plan_to_fleet_spec,
    single_option_cost,
    solve,
)
from skyfleet.planner.types import EngineProfile, Trace
from tests.planner.shared_data import DATA

PROFILE = EngineProfile(gpu="L4", gpus=1, model="m", engine="vllm", prefill_tokens_per_s=8000.0, ttft_base_s=0.05,
                        tpot_base_s=0.02, tpot_batch_slope=0.02, kv_capacity_tokens=100_000, max_num_seqs=128,
                        cold_start_s=60.0, source="test")
SLO = Slo(ttft_p95_s=1.0, tpot_p95_s=0.05)


def opt(name: str, tier: str, usd: float, rps: float, tps: float | None = None, pps: float | None = None,
        max_count: int | None = None) -> Option:
    c = ReplicaCapacity(meets_slo=True, max_batch=8, requests_per_s=rps,
                        output_tokens_per_s=tps if tps is not None else 100 * rps, ttft_s=0.5, tpot_s=0.04, why="",
                        prompt_tokens_per_s=pps if pps is not None else 1000 * rps)
    return Option(instance_type=name, region="us-east-1", tier=tier, usd_per_hour=usd,  # type: ignore[arg-type]
                  profile=PROFILE, capacity=c, max_count=max_count)


def demand(rps: float, tps: float | None = None, pps: float | None = None, *, start: float = 0.0,
           length: float = 3600.0) -> WindowDemand:
    return WindowDemand(start_s=start, end_s=start + length, requests_per_s=rps,
                        output_tokens_per_s=tps if tps is not None else 100 * rps,
                        prompt_tokens_per_s=pps if pps is not None else 1000 * rps, mean_prompt_tokens=1000,
                        mean_output_tokens=100)


A = opt("a", "on-demand", 1.0, 1.0)  # $1.00 per req/s
B = opt("b", "on-demand", 1.5, 2.0)  # $0.75 per req/s
SPOT = opt("s", "spot", 0.3, 1.0)


# -- golden cases ------------------------------------------------------------------------------------------------

def test_the_cheaper_option_per_unit_of_capacity_is_chosen() -> None:
    plan = solve([demand(4.0)], [A, B])
    assert plan.counts == ({1: 2},) and plan.cost_usd == pytest.approx(3.0) and plan.status == "optimal"


def test_integer_rounding_mixes_options() -> None:
    # 3 req/s: 1 b + 1 a = $2.50 beats 2 b = $3.00 and 3 a = $3.00
    plan = solve([demand(3.0)], [A, B])
    assert plan.counts == ({0: 1, 1: 1},) and plan.cost_usd == pytest.approx(2.5)


def test_the_binding_resource_decides_output_tokens() -> None:
    short = opt("short", "on-demand", 1.0, 1.0, tps=100)
    long = opt("long", "on-demand", 1.2, 1.0, tps=300)
    plan = solve([demand(1.0, tps=300)], [short, long])
    assert plan.counts == ({1: 1},) and plan.cost_usd == pytest.approx(1.2)
    plan = solve([demand(1.0, pps=3000)], [short, long])  # prompt tokens bind: 3 of the cheap one
    assert plan.counts == ({0: 3},)


def test_the_on_demand_floor_is_honoured_in_every_window_idle_or_not() -> None:
    plan = solve([demand(2.0), demand(0.0, start=3600)], [A, SPOT], on_demand_floor=1)
    assert plan.counts == ({0: 1, 1: 1}, {0: 1}) and plan.cost_usd == pytest.approx(1.3 + 1.0)
    assert solve([demand(0.0)], [A, SPOT]).counts == ({},)  # no floor: nothing at all
    with pytest.raises(PlanError, match="no on-demand option"):
        solve([demand(1.0)], [SPOT], on_demand_floor=1)


def test_the_spot_fraction_is_honoured() -> None:
    assert solve([demand(4.0)], [A, SPOT]).counts == ({1: 4},)
    plan = solve([demand(4.0)], [A, SPOT], spot_max_fraction=0.5)
    assert plan.counts == ({0: 2, 1: 2},) and plan.cost_usd == pytest.approx(2.6)
    assert solve([demand(4.0)], [A, SPOT], spot_max_fraction=0.0).counts == ({0: 4},)


def test_headroom_window_length_and_max_count() -> None:
    plan = solve([demand(2.0, length=900)], [A, B], headroom=1.5)  # 3 req/s for a quarter hour
    assert plan.counts == ({0: 1, 1: 1},) and plan.cost_usd == pytest.approx(2.5 / 4)
    capped = opt("b", "on-demand", 1.5, 2.0, max_count=1)
    assert solve([demand(6.0)], [A, capped]).counts == ({0: 4, 1: 1},)


def test_an_unmeetable_window_makes_the_plan_infeasible_with_a_note() -> None:
    plan = solve([demand(1.0), demand(9.0, start=3600)], [opt("a", "on-demand", 1.0, 1.0, max_count=3)])
    assert plan.status == "infeasible" and not plan.ok and plan.window_status == ("optimal", "infeasible")
    assert "window 1" in plan.notes[0] and "within max_count" in plan.notes[0]
    with pytest.raises(PlanError, match="infeasible"):
        plan_to_fleet_spec(plan, [A], [demand(1.0)], model="m", slo=SLO, engine="vllm", start_epoch=None,
                           on_demand_floor=0)


def test_bad_arguments() -> None:
    with pytest.raises(PlanError, match="no option"):
        solve([demand(1.0)], [])
    with pytest.raises(PlanError, match="spot_max_fraction"):
        solve([demand(1.0)], [A], spot_max_fraction=1.5)
    with pytest.raises(PlanError, match="headroom"):
        solve([demand(1.0)], [A], headroom=0)


# -- properties --------------------------------------------------------------------------------------------------

option_lists = st.lists(st.builds(
    opt, name=st.sampled_from(["a", "b", "c"]), tier=st.sampled_from(["spot", "on-demand"]),
    usd=st.floats(0.1, 5.0), rps=st.floats(0.2, 5.0), tps=st.floats(10, 1000), pps=st.floats(100, 10_000)),
    min_size=1, max_size=3)
demand_lists = st.lists(st.builds(demand, rps=st.floats(0, 6), tps=st.floats(0, 1500), pps=st.floats(0, 15_000)),
                        min_size=1, max_size=3)


@settings(max_examples=100, deadline=None)
@given(option_lists, demand_lists, st.integers(0, 2), st.floats(1.0, 1.5),
       st.one_of(st.none(), st.floats(0.2, 1.0)))
def test_the_plan_meets_demand_and_is_optimal(options: list[Option], demands: list[WindowDemand], floor: int,
                                              headroom: float, spot_fraction: float | None) -> None:
    if not any(o.tier == "on-demand" for o in options):  # else a floor or a spot fraction has no answer
        floor, spot_fraction = 0, None
    plan = solve(demands, options, on_demand_floor=floor, headroom=headroom, spot_max_fraction=spot_fraction)
    assert plan.ok
    for d, counts in zip(demands, plan.counts, strict=True):
        have = [sum(n * getattr(options[i].capacity, f) for i, n in counts.items())
                for f in ("requests_per_s", "output_tokens_per_s", "prompt_tokens_per_s")]
        for got, need in zip(have, (d.requests_per_s, d.output_tokens_per_s, d.prompt_tokens_per_s), strict=True):
            assert got >= need * headroom * (1 - 1e-6)
        assert sum(n for i, n in counts.items() if options[i].tier == "on-demand") >= floor
        if spot_fraction is not None and not d.empty:
            spot = sum(n * options[i].capacity.requests_per_s for i, n in counts.items() if options[i].tier == "spot")
            assert spot <= spot_fraction * have[0] * (1 + 1e-6) + 1e-9
    assert plan.cost_usd == pytest.approx(sum(plan.window_cost_usd))
    if spot_fraction is None:  # no single option can beat the mix (with the fraction, singles may be infeasible)
        best_single = min(single_option_cost(demands, o, on_demand_floor=floor, headroom=headroom) for o in options)
        assert plan.cost_usd <= best_single * (1 + 1e-6) + 1e-9
    # and it is the optimum: brute force over small counts
    for d, counts in zip(demands, plan.counts, strict=True):
        got = sum(n * options[i].usd_per_hour for i, n in counts.items())
        assert got <= brute_force(d, options, floor, headroom, spot_fraction) * (1 + 1e-6) + 1e-9


def brute_force(d: WindowDemand, options: list[Option], floor: int, headroom: float,
                spot_fraction: float | None) -> float:
    best = math.inf
    limit = 7 + floor
    for counts in itertools.product(range(limit), repeat=len(options)):
        caps = [sum(n * getattr(o.capacity, f) for n, o in zip(counts, options, strict=True))
                for f in ("requests_per_s", "output_tokens_per_s", "prompt_tokens_per_s")]
        needs = (d.requests_per_s, d.output_tokens_per_s, d.prompt_tokens_per_s)
        if any(c < n * headroom * (1 - 1e-9) for c, n in zip(caps, needs, strict=True)):
            continue
        if sum(n for n, o in zip(counts, options, strict=True) if o.tier == "on-demand") < floor:
            continue
        if spot_fraction is not None and not d.empty:
            spot = sum(n * o.capacity.requests_per_s for n, o in zip(counts, options, strict=True) if o.tier == "spot")
            if spot > spot_fraction * caps[0] + 1e-9:
                continue
        best = min(best, sum(n * o.usd_per_hour for n, o in zip(counts, options, strict=True)))
    return best  # inf when the optimum needs more than ``limit`` of an option: then nothing to compare


# -- demand windows ----------------------------------------------------------------------------------------------

def trace(arrivals: list[float], prompt: list[int], output: list[int], start_epoch: float | None = None) -> Trace:
    return Trace(name="t", arrival_s=np.array(arrivals, dtype=np.float64), prompt_tokens=np.array(prompt),
                 output_tokens=np.array(output), start_epoch=start_epoch)


def test_a_window_is_sized_for_its_peak_interval() -> None:
    # window 0 [0, 120): 6 requests spread over the first minute, 30 packed in the second; window 1 empty;
    # window 2 [240, 360): one huge request (the output-token peak differs from the request peak)
    arrivals = [i * 10.0 for i in range(6)] + [60 + i for i in range(30)] + [250.0]
    prompt = [100] * 36 + [6000]
    output = [10] * 36 + [1200]
    d = demand_windows(trace(arrivals, prompt, output), 120, peak_s=60)
    assert [w.start_s for w in d] == [0, 120, 240] and [w.requests for w in d] == [36, 0, 1]
    assert d[0].requests_per_s == pytest.approx(0.5) and d[0].output_tokens_per_s == pytest.approx(5.0)
    assert d[0].prompt_tokens_per_s == pytest.approx(50.0) and d[0].mean_prompt_tokens == 100
    assert d[1].empty and d[1].mean_output_tokens == 0
    assert d[2].output_tokens_per_s == pytest.approx(20.0) and d[2].requests_per_s == pytest.approx(1 / 60)
    mean = demand_windows(trace(arrivals, prompt, output), 120, peak_s=120)[0]
    assert mean.requests_per_s == pytest.approx(36 / 120)  # the window's mean, a third lower than its peak


def test_demand_windows_rejects_bad_lengths() -> None:
    t = trace([0.0, 1.0], [1, 1], [1, 1])
    with pytest.raises(PlanError, match="window"):
        demand_windows(t, 0)
    with pytest.raises(PlanError, match="peak"):
        demand_windows(t, 60, peak_s=-1)
    assert demand_windows(trace([], [], []), 60) == []


# -- options from the catalog ------------------------------------------------------------------------------------

class SpeedBook:
    """A stand-in profile book: speed by accelerator, one replica per instance (all its GPUs)."""

    SPEED = {"T4": 0.25, "A10G": 0.5, "L4": 0.45, "L40S": 1.0, "A100": 1.3, "A100-80GB": 1.5, "H100": 2.5}

    def for_instance(self, t: InstanceType, model: str, engine: str) -> EngineProfile | None:
        s = self.SPEED.get(t.accelerator)
        if s is None:
            return None
        s *= t.accelerator_count ** 0.7
        return EngineProfile(gpu=t.accelerator, gpus=t.accelerator_count, model=model, engine=engine,
                             prefill_tokens_per_s=12000 * s, ttft_base_s=0.03, tpot_base_s=0.012 / s ** 0.5,
                             tpot_batch_slope=0.02, kv_capacity_tokens=int(t.total_gpu_memory_gib * 5000),
                             max_num_seqs=256, cold_start_s=120, source="test")


def test_options_cover_tiers_regions_and_explain_the_types_that_miss_the_slo() -> None:
    catalog = Catalog.builtin()
    options, bad = options_for("m", Slo(ttft_p95_s=0.5, tpot_p95_s=0.05), catalog, SpeedBook(),
                               regions=["us-east-1"], mean_prompt_tokens=1155, mean_output_tokens=211,
                               p95_prompt_tokens=3000, prune=False)
    assert options and {o.region for o in options} == {"us-east-1"}
    assert {o.tier for o in options} == {"spot", "on-demand"}
    for o in options:
        t = catalog.get(o.instance_type, o.region)
        assert o.usd_per_hour == (t.spot_usd_per_hr if o.tier == "spot" else t.ondemand_usd_per_hr)
        assert o.capacity.meets_slo and o.gpus_per_replica == t.accelerator_count
    assert bad and all("at best > SLO" in line for line in bad)
    assert any(line.startswith("g4dn.xlarge (1x T4") and "TTFT" in line for line in bad)
    assert not any(o.instance_type == "g4dn.xlarge" for o in options)
    with pytest.raises(PlanError, match="region"):
        options_for("m", SLO, catalog, SpeedBook(), regions=["mars-1"], mean_prompt_tokens=1, mean_output_tokens=1)


def test_pruning_dominated_options_changes_no_optimum() -> None:
    catalog = Catalog.builtin()
    kw = dict(mean_prompt_tokens=1155.0, mean_output_tokens=211.0, p95_prompt_tokens=3000.0)
    pruned, _ = options_for("m", SLO, catalog, SpeedBook(), **kw)  # type: ignore[arg-type]
    full, _ = options_for("m", SLO, catalog, SpeedBook(), prune=False, **kw)  # type: ignore[arg-type]
    assert len(pruned) < len(full) / 3
    demands = [demand(r, tps=r * 211, pps=r * 1155, start=i * 900, length=900)
               for i, r in enumerate((0.5, 3.0, 11.0, 40.0))]
    for floor in (0, 2):
        a, b = solve(demands, pruned, on_demand_floor=floor), solve(demands, full, on_demand_floor=floor)
        assert a.cost_usd == pytest.approx(b.cost_usd)


# -- the fleet spec ----------------------------------------------------------------------------------------------

def test_the_fleet_spec_has_a_pool_per_option_used_and_daily_schedules() -> None:
    a = Option("g6.xlarge", "us-east-1", "on-demand", 0.8, PROFILE, A.capacity)
    s = Option("g6.xlarge", "us-east-1", "spot", 0.3, PROFILE, SPOT.capacity)
    s2 = Option("g6.xlarge", "us-east-2", "spot", 0.29, PROFILE, SPOT.capacity, max_count=2)
    demands = [demand(r, start=i * 900, length=900) for i, r in enumerate((1.0, 5.0, 0.0))]
    plan = solve(demands, [a, s, s2], on_demand_floor=1, spot_max_fraction=0.7)
    start = 1_700_000_000.0 + 30  # 2023-11-14 22:13:50 UTC
    spec = plan_to_fleet_spec(plan, [a, s, s2], demands, model="m", slo=SLO, engine="vllm", start_epoch=start,
                              on_demand_floor=1, max_headroom=1.5)
    parsed = parse_fleet_spec(spec).models["m"]
    pools = {p.name: p for p in parsed.pools}
    # 5 req/s with at most 70% on spot: 2 on-demand + 2 of the cheapest spot (its max) + 1 of the other
    assert plan.counts[1] == {0: 2, 1: 1, 2: 2}
    assert set(pools) == {"g6-xlarge-od", "g6-xlarge-us-east-1-spot", "g6-xlarge-us-east-2-spot"}
    assert pools["g6-xlarge-od"].min == 1 and parsed.on_demand_floor == 1
    for i, o in enumerate([a, s, s2]):
        if plan.peak(i):
            p = next(p for p in parsed.pools if p.region == o.region and p.tier == o.tier)
            assert p.max == math.ceil(plan.peak(i) * 1.5)
            assert p.tokens_per_s == pytest.approx(100 * o.capacity.requests_per_s)
    assert [(sc.cron, sc.min) for sc in parsed.schedules] == [
        ("13 22 * * *", plan.replicas(0)), ("28 22 * * *", plan.replicas(1)), ("43 22 * * *", 1)]
    assert parsed.schedules[0].duration_s == pytest.approx(950.0) and parsed.schedules[0].timezone == "UTC"
    assert parsed.slo == SLO and parsed.engine == "vllm"
    # the bounds in force follow the plan: at 22:30 UTC the second window's total
    assert parsed.bounds(start + 1000)[0] == plan.replicas(1)
    # without a known start (or with one window) there is nothing to schedule
    flat = plan_to_fleet_spec(plan, [a, s, s2], demands, model="m", slo=SLO, engine="vllm", start_epoch=None,
                              on_demand_floor=1)
    assert "schedules" not in flat["models"]["m"]


def test_a_scale_up_window_is_scheduled_a_cold_start_early() -> None:
    od = Option("g6.xlarge", "us-east-1", "on-demand", 0.8, PROFILE, A.capacity)
    demands = [demand(r, start=i * 900, length=900) for i, r in enumerate((1.0, 5.0, 1.0))]
    plan = solve(demands, [od])
    start = 1_700_000_000.0 + 30  # 22:13:50 UTC
    spec = plan_to_fleet_spec(plan, [od], demands, model="m", slo=SLO, engine="vllm", start_epoch=start,
                              on_demand_floor=0, lead_s=400)
    parsed = parse_fleet_spec(spec).models["m"]
    # window 0 (1 replica) and 1 (5: a scale-up) start 400 s early, window 2 (back to 1) on time
    assert [(sc.cron, sc.min) for sc in parsed.schedules] == [("7 22 * * *", 1), ("22 22 * * *", 5),
                                                              ("43 22 * * *", 1)]
    assert parsed.bounds(start + 900 - 300)[0] == 5  # 5 minutes before the busy window: already 5
    assert parsed.bounds(start + 1800 + 30)[0] == 1
    assert parsed.schedules[1].duration_s == pytest.approx(1310.0)  # 22:22:00 to the window's end, 22:43:50
    assert all(p.min == 0 for p in parsed.pools)  # outside the schedules the live policy decides


def test_a_plan_without_replicas_still_yields_a_valid_spec() -> None:
    od = Option("g6.xlarge", "us-east-1", "on-demand", 0.8, PROFILE, A.capacity)
    spot = Option("g6.xlarge", "us-east-1", "spot", 0.3, PROFILE, SPOT.capacity)
    plan = solve([demand(0.0)], [od, spot])
    spec = plan_to_fleet_spec(plan, [od, spot], [demand(0.0)], model="m", slo=SLO, engine="vllm",
                              start_epoch=None, on_demand_floor=0)
    pools = parse_fleet_spec(spec).models["m"].pools
    assert [(p.name, p.min, p.max) for p in pools] == [("g6-xlarge-spot", 0, 1)]  # the cheapest per token


# -- the real trace ----------------------------------------------------------------------------------------------

def test_the_azure_conversation_trace_is_planned_in_well_under_five_seconds() -> None:
    from skyfleet.planner.traces import read_azure_csv

    t = read_azure_csv(DATA / "azure_llm_2023_conv.csv")
    assert len(t) == 19_366
    demands = demand_windows(t, 60)
    assert len(demands) == 59
    options, _ = options_for("m", SLO, Catalog.builtin(), SpeedBook(), regions=["us-east-1", "us-east-2"],
                             mean_prompt_tokens=float(t.prompt_tokens.mean()),
                             mean_output_tokens=float(t.output_tokens.mean()), prune=False)
    assert len(options) >= 30
    started = time.perf_counter()
    plan = solve(demands, options, on_demand_floor=1)
    elapsed = time.perf_counter() - started
    assert plan.status == "optimal" and elapsed < 5.0
    assert all(plan.replicas(w) >= 1 for w in range(len(demands)))
    spec = plan_to_fleet_spec(plan, options, demands, model="m", slo=SLO, engine="vllm",
                              start_epoch=t.start_epoch, on_demand_floor=1)
    parse_fleet_spec(spec)
