"""The compared policies: static-peak sizing, the HPA-style reactive rule, the oracle's plan, compare()."""

from __future__ import annotations

import numpy as np
import pytest

from skyfleet.fleet.policy.base import PolicyState
from skyfleet.fleet.policy.signals import QueueSample, ReplicaSample, SignalWindow
from skyfleet.planner.policies import (
    POLICIES,
    OraclePolicy,
    ReactivePolicy,
    StaticPolicy,
    compare,
    oracle_plan,
    pool_capacities,
    static_peak_counts,
    warm_fleet,
)
from skyfleet.planner.simulator import DEFAULT_EPOCH, simulate
from skyfleet.planner.spot import SpotTrace
from skyfleet.planner.types import Trace

from .test_simulator import CATALOG, fleet, profile

PROF = profile(tpot_base_s=0.02, tpot_batch_slope=0.05, prefill_tokens_per_s=5000.0, cold_start_s=60.0)
F = fleet(("od", "on-demand", 8), ("sp", "spot", 8), floor=1)
PROFS = {"od": PROF, "sp": PROF}


def poisson(rate_fn, duration: float, seed: int = 3) -> Trace:
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    while t < duration:
        t += rng.exponential(1.0 / rate_fn(t))
        out.append(t)
    a = np.array(out[:-1])
    return Trace("p", a, rng.integers(200, 800, a.size), rng.integers(20, 120, a.size))


def test_static_peak_covers_the_peak_minute_on_demand_only() -> None:
    tr = poisson(lambda t: 2.0 if t < 300 else 8.0, 600)
    counts = static_peak_counts(tr, F, PROFS, CATALOG)
    cap = pool_capacities(tr, F, PROFS)["od"]
    assert counts["sp"] == 0 and counts["od"] >= 1
    peak = max(np.histogram(tr.arrival_s, bins=np.arange(0, 661, 60))[0]) / 60.0
    assert counts["od"] * cap.requests_per_s >= peak * 0.999
    assert (counts["od"] - 1) * cap.requests_per_s < peak  # no more than needed for requests/s... or tokens
    d, st = StaticPolicy(counts).decide(F, SignalWindow().snapshot(0.0), CATALOG, 0.0, PolicyState())
    assert d.desired == counts and st.desired == counts


def _window(now: float, running: float, waiting: float, replicas: int, queue: int = 0):
    w = SignalWindow()
    for k in range(replicas):
        for dt in (10.0, 5.0, 0.0):
            w.add(ReplicaSample(now - dt, f"od-{k}", "od", running=running, waiting=waiting))
    w.add_queue(QueueSample(now, queue))
    return w.snapshot(now)


def test_reactive_is_hpa_like() -> None:
    pol = ReactivePolicy({"od": 10.0, "sp": 10.0})  # 10 concurrent requests per replica; target 0.7
    state = PolicyState(desired={"od": 2, "sp": 0})
    # 2 replicas x 14 requests = 28 of 20: desired = ceil(2 x 1.4 / 0.7) = 4
    d, _ = pol.decide(F, _window(100.0, 14.0, 0.0, 2), CATALOG, 100.0, state)
    assert d.total == 4 and d.direction == 1
    # within 10% of the target: unchanged
    d, _ = pol.decide(F, _window(100.0, 7.2, 0.0, 2), CATALOG, 100.0, state)
    assert d.total == 2
    # scale-up limited to max(2n, n + 4) per decision
    d, _ = pol.decide(F, _window(100.0, 100.0, 50.0, 1), CATALOG, 100.0, PolicyState(desired={"od": 1, "sp": 0}))
    assert d.total == 5
    # down only to the highest recommendation of the last 300 s
    d1, s1 = pol.decide(F, _window(100.0, 14.0, 0.0, 4), CATALOG, 100.0, PolicyState(desired={"od": 1, "sp": 3}))
    assert d1.total == 8
    d2, _ = pol.decide(F, _window(200.0, 1.0, 0.0, 4), CATALOG, 200.0, s1.__class__(desired={"od": 1, "sp": 3},
                                                                                      history=s1.history))
    assert d2.total == 4  # 8 was recommended at 100: hold (never above the current 4)
    d3, _ = pol.decide(F, _window(500.0, 1.0, 0.0, 4), CATALOG, 500.0, PolicyState(desired={"od": 1, "sp": 3},
                                                                                      history=s1.history))
    assert d3.total == 1 and d3.desired["od"] == 1  # the floor stays on-demand


def test_oracle_plan_follows_the_load_and_avoids_lost_spot() -> None:
    tr = poisson(lambda t: 1.0 if t < 120 else 60.0, 240)
    plan = oracle_plan(tr, F, PROFS, CATALOG)
    assert len(plan) == 4
    assert sum(plan[0].values()) < sum(plan[3].values())
    assert all(p["od"] >= 1 for p in plan)  # the on-demand floor
    gone = SpotTrace("g", "z", starts=(0.0, 150.0), up=(True, False), period_s=1e9, cyclic=False)
    plan2 = oracle_plan(tr, F, PROFS, CATALOG, spot={"sp": gone})
    assert plan2[0]["sp"] == plan[0]["sp"]
    assert plan2[2]["sp"] == 0 and plan2[3]["sp"] == 0  # capacity gone from 150 s (windows 2 and 3)
    pol = OraclePolicy(plan, epoch=DEFAULT_EPOCH)
    d, _ = pol.decide(F, SignalWindow().snapshot(0.0), CATALOG, DEFAULT_EPOCH + 130.0, PolicyState())
    assert dict(d.desired) == plan[2]
    r = simulate(tr, F, PROFS, policy=pol, catalog=CATALOG)
    assert all(b.ready_s == b.start_s for b in r.billing)  # clairvoyant: no cold start


def test_compare_runs_every_policy_on_the_same_trace() -> None:
    tr = poisson(lambda t: 1.0 + 4.0 * (t > 200), 420)
    res = compare(tr, F, PROFS, catalog=CATALOG)
    assert list(res) == list(POLICIES)
    for name, r in res.items():
        assert r.policy == name and r.requests == len(tr)
        assert r.completed + r.dropped + r.rejected == r.requests
    assert res["static-peak"].cost_by_tier["spot"] == 0.0
    assert res["oracle"].cost_usd <= res["static-peak"].cost_usd
    direct = simulate(tr, F, PROFS, policy="default", catalog=CATALOG, initial=warm_fleet(tr, F, PROFS, CATALOG))
    assert direct.cost_usd == pytest.approx(res["skyfleet"].cost_usd)
    two = compare(tr, F, PROFS, catalog=CATALOG, policies=["skyfleet", "static-peak"], processes=2)
    assert two["skyfleet"].cost_usd == pytest.approx(res["skyfleet"].cost_usd)
