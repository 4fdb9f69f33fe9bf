"""The trace-replay simulator against cases computed by hand from the timing model's two formulas."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.cost.catalog import Catalog
from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import Decision, PolicyState
from skyfleet.fleet.policy.signals import WindowSnapshot
from skyfleet.fleet.spec import ModelFleet
from skyfleet.planner.policies import StaticPolicy
from skyfleet.planner.simulator import DEFAULT_EPOCH, PREEMPTION_NOTICE_S, SimulationError, simulate
from skyfleet.planner.spot import SpotTrace
from skyfleet.planner.types import EngineProfile, Trace

CATALOG = Catalog.builtin()
OD_PRICE = CATALOG.get("g6e.xlarge", "us-east-1").ondemand_usd_per_hr
SPOT_PRICE = CATALOG.get("g6e.xlarge", "us-east-1").spot_usd_per_hr


def profile(**kw: float) -> EngineProfile:
    base: dict = dict(gpu="L40S", gpus=1, model="m", engine="vllm", prefill_tokens_per_s=1000.0, ttft_base_s=0.1,
                      tpot_base_s=0.01, tpot_batch_slope=0.0, kv_capacity_tokens=1 << 20, max_num_seqs=256,
                      cold_start_s=30.0, source="test")
    base.update(kw)
    return EngineProfile(**base)


def fleet(*pools: tuple[str, str, int], floor: int = 0, **extra: object) -> ModelFleet:
    """Pools as (name, tier, max) of g6e.xlarge in us-east-1."""
    spec = [{"name": n, "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": t, "max": m}
            for n, t, m in pools]
    return ModelFleet.model_validate({"engine": "vllm", "pools": spec, "on_demand_floor": floor, **extra},
                                     context={"catalog": CATALOG})


def trace(rows: list[tuple[float, int, int]], **kw: object) -> Trace:
    a = np.array([r[0] for r in rows], dtype=np.float64)
    return Trace("t", a, np.array([r[1] for r in rows], dtype=np.int64),
                 np.array([r[2] for r in rows], dtype=np.int64), **kw)  # type: ignore[arg-type]


ONE = fleet(("a", "on-demand", 4))


def run(tr: Trace, f: ModelFleet = ONE, prof: EngineProfile | None = None, counts: dict | None = None, **kw):
    prof = prof or profile()
    return simulate(tr, f, {p.name: prof for p in f.pools}, policy=StaticPolicy(counts or {"a": 1}),
                    catalog=CATALOG, **kw)


def test_two_requests_on_one_replica_match_the_formulas() -> None:
    # slope 0.5: tpot(2) = 0.015. r0 (100 prompt, 11 out) at 0: first token 0.1 + 0.1 = 0.2, then 10 tokens
    # at batch 2 (r1 admitted at 0.05) = 0.35. r1 (300 prompt, 5 out) at 0.05: first token 0.05 + 0.1 + 0.3
    # = 0.45, alone from 0.35: 4 tokens at 0.01 -> 0.49.
    r = run(trace([(0.0, 100, 11), (0.05, 300, 5)]), prof=profile(tpot_batch_slope=0.5))
    assert r.completed == 2 and r.dropped == 0
    assert r.ttft_s == pytest.approx([0.2, 0.4])
    assert r.tpot_s == pytest.approx([0.015, 0.01])
    assert r.e2e_s == pytest.approx([0.35, 0.44])
    assert r.attainment == {"ttft": 1.0, "tpot": 1.0, "both": 1.0}


def test_kv_capacity_queues_the_second_request() -> None:
    # 1000 KV tokens: r0 holds 800 until it finishes at 0.1 + 0.5 + 299 * 0.01 = 3.59; r1 (400) waits.
    r = run(trace([(0.0, 500, 300), (0.01, 300, 100)]), prof=profile(kv_capacity_tokens=1000))
    assert r.e2e_s[0] == pytest.approx(3.59)
    assert r.ttft_s[1] == pytest.approx(3.59 + 0.1 + 0.3 - 0.01)
    assert r.e2e_s[1] == pytest.approx(3.99 + 0.99 - 0.01)


def test_cold_start_delays_the_first_request() -> None:
    # nothing warm: the first decision (t=0) starts a replica READY at 30 s; the request at 1 s waits for it
    r = run(trace([(1.0, 100, 2)]), initial={})
    assert r.ttft_s[0] == pytest.approx(30.0 - 1.0 + 0.2)
    assert r.delayed == 1 and r.dropped == 0
    assert r.billing[0].start_s == 0.0 and r.billing[0].ready_s == 30.0


def test_admission_queue_drops_after_its_timeout() -> None:
    # READY at 100 s: the request of 1 s has waited 60 s at 61 (503); the one of 50 s is served at 100
    r = run(trace([(1.0, 100, 2), (50.0, 100, 2)]), prof=profile(cold_start_s=100.0), initial={})
    assert r.dropped == 1 and r.completed == 1 and r.delayed == 1
    assert math.isnan(r.ttft_s[0])
    assert r.ttft_s[1] == pytest.approx(50.0 + 0.2)
    assert r.attainment["both"] == 0.0  # the drop fails; the other waited 50 s


@settings(max_examples=20, deadline=None)
@given(n_a=st.integers(1, 3), n_b=st.integers(0, 3), last=st.floats(1.0, 7200.0))
def test_cost_is_price_times_billed_hours(n_a: int, n_b: int, last: float) -> None:
    f = fleet(("a", "on-demand", 4), ("b", "spot", 4))
    r = run(trace([(0.0, 10, 1), (last, 10, 1)]), f=f, counts={"a": n_a, "b": n_b})
    end = r.duration_s
    assert end == pytest.approx(last + 0.11)  # the last answer: 0.1 + 10 / 1000 after it arrived
    assert r.cost_by_pool["a"] == pytest.approx(n_a * OD_PRICE * end / 3600)
    assert r.cost_by_pool["b"] == pytest.approx(n_b * SPOT_PRICE * end / 3600)
    assert r.cost_usd == pytest.approx(r.cost_by_tier["on-demand"] + r.cost_by_tier["spot"])
    assert r.gpu_hours == pytest.approx((n_a + n_b) * end / 3600)
    assert r.series["cost_usd"][-1] <= r.cost_usd + 1e-9


GONE_AT_10 = SpotTrace("gone", "z", starts=(0.0, 10.0), up=(True, False), period_s=1e9, cyclic=False)
SPOT_OD = fleet(("od", "on-demand", 1), ("sp", "spot", 1))


def test_preemption_moves_unfinished_work_and_counts_it() -> None:
    # two long requests, one per replica; spot is gone at 10 s: its request is retried on "od" at the
    # deadline (10 + 120 s), TTFT counted from its arrival; the spot replica bills until the deadline
    r = run(trace([(1.0, 100, 20_000), (2.0, 100, 20_000)]), f=SPOT_OD, spot=GONE_AT_10,
            counts={"od": 1, "sp": 1})
    assert r.preemptions == 1 and r.retried == 1 and r.completed == 2
    assert r.start_failures > 0  # the policy keeps asking for its spot replica
    spot_bill = next(b for b in r.billing if b.pool == "sp")
    assert spot_bill.stop_s == pytest.approx(10.0 + PREEMPTION_NOTICE_S)
    moved = int(np.nanargmax(r.ttft_s))
    assert r.ttft_s[moved] >= 10.0 + PREEMPTION_NOTICE_S - 2.0


def test_preempted_replica_finishes_short_work_before_the_deadline() -> None:
    r = run(trace([(1.0, 100, 2000), (2.0, 100, 2000)]), f=SPOT_OD, spot=GONE_AT_10, counts={"od": 1, "sp": 1})
    assert r.preemptions == 1 and r.retried == 0 and r.completed == 2
    spot_bill = next(b for b in r.billing if b.pool == "sp")
    assert 10.0 < spot_bill.stop_s < 10.0 + PREEMPTION_NOTICE_S  # stopped when its request finished


def test_no_start_while_spot_is_unavailable() -> None:
    never = SpotTrace.constant(False)
    f = fleet(("sp", "spot", 2))
    r = simulate(trace([(1.0, 10, 1)]), f, {"sp": profile()}, policy=StaticPolicy({"sp": 1}), catalog=CATALOG,
                 spot=never)
    assert r.dropped == 1 and r.cost_usd == 0.0 and r.start_failures >= 1


@dataclass
class Recorder:
    """A policy that records its calls and delegates to the default policy."""

    name: str = "recorder"
    inner: object = field(default_factory=lambda: load_policy("default"))
    calls: list = field(default_factory=list)

    def decide(self, spec: ModelFleet, window: WindowSnapshot, catalog: Catalog, now: float,
               state: PolicyState) -> tuple[Decision, PolicyState]:
        decision, nxt = self.inner.decide(spec, window, catalog, now, state)  # type: ignore[attr-defined]
        self.calls.append((spec, window, catalog, now, state, nxt))
        return decision, nxt


def test_policy_is_called_like_the_controller_calls_it() -> None:
    rec = Recorder()
    f = fleet(("a", "on-demand", 4), floor=1)
    tr = trace([(float(t), 200, 50) for t in range(0, 120, 2)])
    simulate(tr, f, {"a": profile()}, policy=rec, catalog=CATALOG)
    assert len(rec.calls) >= 12
    for k, (spec, window, catalog, now, state, _) in enumerate(rec.calls):
        assert spec is f and catalog is CATALOG and isinstance(window, WindowSnapshot)
        assert now == pytest.approx(DEFAULT_EPOCH + 10.0 * k)  # wall = epoch + virtual time, every 10 s
        assert state is (PolicyState() if k == 0 else rec.calls[k - 1][5]) or k == 0
        assert all(s.at <= now for samples in window.replicas for s in samples)
    # scrapes every 5 s: by the second decision the window holds the replica's samples at 5 and 10 s
    _, window, _, now, _, _ = rec.calls[1]
    assert [s.at - DEFAULT_EPOCH for s in window.replicas[0]][-2:] == [5.0, 10.0]
    assert window.replicas[0][-1].generation_tokens_total is not None


def test_trace_epoch_is_the_wall_clock() -> None:
    rec = Recorder()
    simulate(trace([(0.0, 10, 1)], start_epoch=1_800_000_000.0), ONE, {"a": profile()}, policy=rec,
             catalog=CATALOG)
    assert rec.calls[0][3] == 1_800_000_000.0


def test_draining_replica_finishes_its_work() -> None:
    class Shrink:
        name = "shrink"

        def decide(self, spec, window, catalog, now, state):  # type: ignore[no-untyped-def]
            n = 2 if now - DEFAULT_EPOCH < 20 else 1
            return Decision(desired={"a": n}), PolicyState(desired={"a": n})

    # two long requests (one per replica) at 1 s; at 20 s one replica drains but serves its request to the end
    r = simulate(trace([(1.0, 100, 5000), (1.0, 100, 5000)]), ONE, {"a": profile()}, policy=Shrink(),
                 catalog=CATALOG)
    assert r.completed == 2 and r.retried == 0
    stops = sorted(b.stop_s for b in r.billing)
    assert stops[0] == pytest.approx(1.0 + 0.2 + 4999 * 0.01)  # the drained one stops when its request ends


def test_same_inputs_same_result() -> None:
    rng = np.random.default_rng(7)
    n = 400
    tr = Trace("r", np.sort(rng.uniform(0, 300, n)), rng.integers(10, 2000, n), rng.integers(1, 300, n))
    f = fleet(("a", "on-demand", 4), ("b", "spot", 4), floor=1)
    profs = {"a": profile(tpot_batch_slope=0.05), "b": profile(tpot_batch_slope=0.05)}
    one = simulate(tr, f, profs, catalog=CATALOG, seed=1).to_json(requests=True)
    two = simulate(tr, f, profs, catalog=CATALOG, seed=1).to_json(requests=True)
    one.pop("wall_s"), two.pop("wall_s")
    assert one == two
    json.dumps(one, allow_nan=False)  # JSON-serialisable


def test_prefix_hashes_hit_the_cache_and_route_together() -> None:
    # Mooncake-style: 512-token blocks; the second turn of a conversation shares the first's two blocks
    blocks = ((1, 2), (1, 2, 3), (9, 8), (7, 6))
    tr = trace([(0.0, 1024, 2), (5.0, 1536, 2), (5.0, 1024, 2), (6.0, 1024, 2)], hash_ids=blocks,
               block_tokens=512)
    f = fleet(("a", "on-demand", 4))
    r = run(tr, f=f, counts={"a": 2})
    # turn 2: 1024 of its 1536 tokens cached -> 0.1 + 512 / 1000; the unrelated one computes all 1024
    assert r.ttft_s[1] == pytest.approx(0.1 + 0.512)
    assert r.ttft_s[2] == pytest.approx(0.1 + 1.024)


def test_rejects_what_it_cannot_run() -> None:
    with pytest.raises(SimulationError):
        simulate(trace([]), ONE, {"a": profile()}, catalog=CATALOG)
    with pytest.raises(SimulationError, match="pool 'a'"):
        simulate(trace([(0.0, 1, 1)]), ONE, {}, catalog=CATALOG)
    r = run(trace([(0.0, 40_000, 10)]))  # longer than max_model_len 32768: a 400, not counted
    assert r.rejected == 1 and r.attainment["both"] is None


def test_spot_capacity_gone_falls_back_to_on_demand_like_the_controller() -> None:
    # the default policy keeps one replica, spot first; at 10 s spot capacity is gone: the policy sees the
    # spot pool capped at what it has (none), as the live controller shows it, and starts one on-demand
    f = fleet(("sp", "spot", 2), ("od", "on-demand", 2))
    rec = Recorder()
    rows = [(float(t), 50, 20) for t in range(1, 300, 5)]
    r = simulate(trace(rows), f, {p.name: profile() for p in f.pools}, policy=rec, catalog=CATALOG, spot=GONE_AT_10)
    assert r.preemptions == 1 and r.dropped == 0 and r.completed == len(rows)
    seen = [spec.pool("sp").max for spec, *_ in rec.calls]
    assert seen[0] == 2 and 0 in seen  # capped once the capacity was gone
    assert r.cost_by_pool["od"] > 0
