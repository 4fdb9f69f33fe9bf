"""Attribution: a golden hand-computed scenario and the conservation property (hypothesis)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.cost.attribution import IntervalCost, UsageSlice, attribute
from skyfleet.cost.pricing import TokenPrices, TokenWeights

T0 = datetime(2025, 1, 1, tzinfo=UTC)
W = TokenWeights(prefill=0.25, cached=0.025, decode=1.0)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def req(rid: str, start: float, end: float, *, prompt: int = 0, cached: int = 0, completion: int = 0,
        owner: str = "gw1", replica: str = "local-0", tenant: str = "t1", model: str = "m",
        pool: str = "local") -> UsageSlice:
    return UsageSlice(request_id=rid, owner=owner, replica_id=replica, tenant_id=tenant, key_id="k-" + tenant,
                      model=model, pool=pool, start=at(start), end=at(end), prompt_tokens=prompt,
                      cached_tokens=cached, completion_tokens=completion)


def test_golden_scenario() -> None:
    """Replica gw1/local-0 at $3.60/h = $0.001/s for [0, 10] s; gw1/local-1 at $7.20/h = $0.002/s for [5, 10] s.

    local-0: A in [1, 5], 40 completion tokens (40 weighted, density 10/s);
             B in [3, 7], 40 uncached prompt tokens + 15 completion (0.25*40 + 15 = 25 weighted over 4 s,
             density 6.25/s).
      [0, 1] idle 0.001; [1, 3] A 0.002; [3, 5] A 0.002 * 10/16.25 = 0.00123077, B 0.002 * 6.25/16.25 = 0.00076923;
      [5, 7] B 0.002; [7, 10] idle 0.003.
      A = 0.00323077, B = 0.00276923, idle = 0.004, total = 0.010.
    local-1: C in [6, 8], 100 cached prompt tokens + 0 completion (weight 2.5; alone, so all of it):
      C = 0.002 * 2 = 0.004, idle = 0.002 * 3 = 0.006, total = 0.010.
    D: tenant t2 on an API-priced model "api-m" (no interval) with 1000 prompt and 100 completion tokens at
      $1 / $2 per Mtok: 0.001 + 0.0002 = 0.0012, reported apart.
    Window [2, 10]: local-0 loses [0, 2]: idle -0.001, A -0.001 -> A = 0.00223077, total 0.008.
    """
    intervals = [IntervalCost("gw1", "local-0", "local", 3.6, at(0), at(10)),
                 IntervalCost("gw1", "local-1", "local", 7.2, at(5), at(10))]
    usage = [req("A", 1, 5, completion=40), req("B", 3, 7, prompt=40, completion=15),
             req("C", 6, 8, prompt=100, cached=100, replica="local-1"),
             req("D", 4, 6, prompt=1000, completion=100, tenant="t2", model="api-m", pool="api", owner="",
                 replica="api-0")]
    prices = {"api-m": TokenPrices(1.0, 1.0, 2.0)}
    r = attribute(intervals, usage, start=at(0), end=at(10), weights=W, token_prices=prices)
    assert r.by_request == pytest.approx({"A": 0.002 + 0.002 * 10 / 16.25, "B": 0.002 * 6.25 / 16.25 + 0.002,
                                          "C": 0.004}, rel=1e-12)
    assert r.idle_by_replica == pytest.approx({"gw1/local-0": 0.004, "gw1/local-1": 0.006}, rel=1e-12)
    assert r.idle_by_pool == pytest.approx({"local": 0.010}, rel=1e-12)
    assert r.total_by_replica == pytest.approx({"gw1/local-0": 0.010, "gw1/local-1": 0.010}, rel=1e-12)
    assert r.api_by_request == pytest.approx({"D": 0.0012}, rel=1e-12) and r.unpriced == ()
    assert r.by("tenant") == pytest.approx({"t1": 0.010, "t2": 0.0012}, rel=1e-12)
    assert {row.kind for row in r.rows()} == {"request", "idle", "api"}

    clipped = attribute(intervals, usage, start=at(2), end=at(10), weights=W, token_prices=prices)
    assert clipped.by_request["A"] == pytest.approx(0.001 + 0.002 * 10 / 16.25, rel=1e-12)
    assert clipped.idle_by_replica["gw1/local-0"] == pytest.approx(0.003, rel=1e-12)
    assert clipped.total_by_replica["gw1/local-0"] == pytest.approx(0.008, rel=1e-12)
    # Without a price the API request is listed as unpriced.
    assert attribute(intervals, usage, start=at(0), end=at(10), weights=W).unpriced == ("D",)


def test_requests_of_zero_weight_share_equally_and_other_owners_do_not_match() -> None:
    intervals = [IntervalCost("gw1", "local-0", "local", 3.6, at(0), at(4)),
                 IntervalCost("gw2", "local-0", "local", 3.6, at(0), at(4))]
    usage = [req("a", 0, 2), req("b", 0, 2), req("c", 1, 3, completion=5, owner="gw2")]
    r = attribute(intervals, usage, start=at(0), end=at(4), weights=W)
    assert r.by_request == pytest.approx({"a": 0.001, "b": 0.001, "c": 0.002}, rel=1e-12)
    assert r.idle_by_replica == pytest.approx({"gw1/local-0": 0.002, "gw2/local-0": 0.002}, rel=1e-12)


times = st.integers(min_value=0, max_value=10_000_000)  # microseconds


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[IntervalCost], list[UsageSlice], datetime, datetime]:
    replicas = [(f"gw{draw(st.integers(1, 2))}", f"local-{i}") for i in range(draw(st.integers(1, 4)))]
    intervals = []
    for owner, rid in replicas:
        for _ in range(draw(st.integers(1, 3))):
            a, b = sorted((draw(times), draw(times)))
            intervals.append(IntervalCost(owner, rid, f"pool{len(rid) % 2}", draw(st.floats(0, 100)),
                                          T0 + timedelta(microseconds=a), T0 + timedelta(microseconds=b)))
    usage = []
    for i in range(draw(st.integers(0, 40))):
        owner, rid = draw(st.sampled_from(replicas))
        a, b = sorted((draw(times), draw(times)))
        prompt = draw(st.integers(0, 5000))
        usage.append(UsageSlice(f"r{i}", owner, rid, f"t{i % 3}", "k", "m", "p", T0 + timedelta(microseconds=a),
                                T0 + timedelta(microseconds=b), prompt, draw(st.integers(0, prompt)),
                                draw(st.integers(0, 5000))))
    w0, w1 = sorted((draw(times), draw(times)))
    return intervals, usage, T0 + timedelta(microseconds=w0), T0 + timedelta(microseconds=w1)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.builds(lambda p, c, d: TokenWeights(p, min(p, c), d), st.floats(0, 10), st.floats(0, 10),
                              st.floats(0, 10)))
def test_conservation(scenario: tuple[list[IntervalCost], list[UsageSlice], datetime, datetime],
                      weights: TokenWeights) -> None:
    """attributed + idle == the intervals' cost clipped to the window (to 1e-9 relative), nothing negative."""
    intervals, usage, start, end = scenario
    r = attribute(intervals, usage, start=start, end=end, weights=weights)
    expected = math.fsum(iv.usd_per_hour / 3600 * max(0.0, (min(iv.end, end) - max(iv.start, start)).total_seconds())
                         for iv in intervals)
    assert r.total == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert r.attributed + r.idle == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert all(v >= 0 for v in (*r.by_request.values(), *r.idle_by_replica.values()))
    assert math.fsum(r.idle_by_pool.values()) == pytest.approx(r.idle, rel=1e-12, abs=1e-15)
