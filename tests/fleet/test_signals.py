"""The observed window: samples from real engine scrapes, rates, p95 from histogram deltas, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyfleet.engines.metrics import Histogram, parse_metrics
from skyfleet.fleet.policy.signals import QueueSample, ReplicaSample, SignalWindow, merge_histograms

FIXTURES = Path(__file__).resolve().parents[1] / "engines" / "fixtures"
BOUNDS = (0.1, 0.5, 1.0, float("inf"))


def hist(*counts: float, total: float = 0.0) -> Histogram:
    """Cumulative histogram on BOUNDS from per-bucket counts."""
    cumulative, running = [], 0.0
    for c in counts:
        running += c
        cumulative.append(running)
    return Histogram(tuple(zip(BOUNDS, cumulative, strict=True)), total, running)


def sample(at: float, rid: str = "r0", pool: str = "p", *, running: float = 0, waiting: float = 0,
           gen: float | None = None, ttft: Histogram | None = None) -> ReplicaSample:
    return ReplicaSample(at=at, replica_id=rid, pool=pool, running=running, waiting=waiting,
                         generation_tokens_total=gen, ttft=ttft)


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llama"])
def test_samples_come_from_the_engine_adapters(kind: str) -> None:
    name = {"llama": "llamacpp"}.get(kind, kind)
    m = parse_metrics(kind, (FIXTURES / f"{name}_metrics.txt").read_text())  # type: ignore[arg-type]
    s = ReplicaSample.from_metrics(10.0, "r0", "pool-a", m)
    assert (s.running, s.waiting, s.kv_cache_usage) == (m.requests_running, m.requests_waiting, m.kv_cache_usage)
    assert s.generation_tokens_total == m.generation_tokens_total and s.ttft is m.ttft_seconds
    assert s.tpot is m.tpot_seconds and s.pool == "pool-a"


def test_rates_are_counter_deltas_and_survive_an_engine_restart() -> None:
    w = SignalWindow()
    for at, gen in [(0, 1000), (10, 2000), (20, 3000), (30, 500), (40, 1500)]:  # restart between 20 and 30
        w.add(sample(at, gen=gen))
    agg = w.snapshot(40).aggregate(40, 40)
    # Baseline: the sample at the start of the period (t=0). Increase: 1000 + 1000 + 500 (restart) + 1000.
    assert agg.generation_tps == pytest.approx(3500 / 40)
    # Base t=20 (3000) -> t=30 (500: a restart, +500) -> t=40 (+1000).
    assert w.snapshot(40).aggregate(40, 15).generation_tps == pytest.approx(1500 / 20)


def test_means_maxes_and_the_queue_over_the_period() -> None:
    w = SignalWindow()
    for at, running, waiting in [(0, 9, 9), (10, 2, 0), (20, 4, 2)]:
        w.add(sample(at, "a", running=running, waiting=waiting))
    w.add(sample(20, "b", running=1, waiting=1))
    w.add_queue(QueueSample(5, 7))
    w.add_queue(QueueSample(15, 1))
    w.add_queue(QueueSample(20, 3))
    agg = w.snapshot(20).aggregate(20, 15)  # (5, 20]: a's t=10 and t=20, b's t=20
    assert agg.running_mean == pytest.approx(3 + 1) and agg.running_max == 4 + 1
    assert agg.waiting_mean == pytest.approx(1 + 1) and agg.waiting_latest == 2 + 1
    assert (agg.queue_mean, agg.queue_max, agg.queue_latest) == (2.0, 3, 3)
    assert {r.replica_id for r in agg.replicas} == {"a", "b"}
    assert agg.pool_count("p") == 2
    assert [r.replica_id for r in w.snapshot(30).aggregate(30, 5).replicas] == []  # nothing in (25, 30]


def test_p95_comes_from_histogram_deltas_merged_over_replicas() -> None:
    w = SignalWindow()
    # Replica a: 100 old fast observations, then 10 slow ones in the period. Replica b: 10 medium ones.
    w.add(sample(0, "a", ttft=hist(100, 0, 0, 0)))
    w.add(sample(10, "a", ttft=hist(100, 0, 0, 10)))
    w.add(sample(0, "b", ttft=hist(0, 0, 0, 0)))
    w.add(sample(10, "b", ttft=hist(0, 10, 0, 0)))
    agg = w.snapshot(10).aggregate(10, 10)
    # Period observations: 10 in (0.1, 0.5] and 10 in (1, +inf): the p95 is in the +Inf bucket -> 1.0.
    assert agg.ttft_p95_s == 1.0
    assert agg.tpot_p95_s is None
    # Only the old fast ones would give a p95 in the first bucket: the delta matters.
    assert merge_histograms([hist(100, 0, 0, 0)]).quantile(0.95) == pytest.approx(0.095)  # type: ignore[union-attr]
    # A single sample in the period gives no delta (its histogram covers the engine's whole life).
    w2 = SignalWindow()
    w2.add(sample(10, "a", ttft=hist(0, 0, 0, 50)))
    assert w2.snapshot(10).aggregate(10, 10).ttft_p95_s is None


def test_histograms_with_different_bounds_merge_on_the_union() -> None:
    a = Histogram(((1.0, 2.0), (float("inf"), 4.0)), 10.0, 4.0)
    b = Histogram(((0.5, 1.0), (float("inf"), 1.0)), 0.3, 1.0)
    m = merge_histograms([a, b])
    assert m is not None and m.buckets == ((0.5, 1.0), (1.0, 3.0), (float("inf"), 5.0)) and m.count == 5.0
    assert merge_histograms([]) is None


def test_the_window_is_bounded_in_time_samples_and_replicas() -> None:
    w = SignalWindow(horizon_s=100, max_samples=3, max_replicas=2)
    for at in range(10):
        w.add(sample(at, "a"))
    assert len(w.snapshot(9).replicas[0]) == 3  # ring buffer
    w.add(sample(50, "b"))
    w.add(sample(60, "c"))  # evicts the stalest replica (a)
    assert w.replica_ids() == ["b", "c"]
    w.add_queue(QueueSample(60, 1))
    snap = w.snapshot(155)  # horizon 100: b (t=50) is gone, c (t=60) stays
    assert [s[0].replica_id for s in snap.replicas] == ["c"] and len(snap.queue) == 1
    w.forget("c")
    assert w.snapshot(155).replicas == ()
    with pytest.raises(ValueError):
        SignalWindow(max_samples=1)


def test_samples_must_arrive_in_order() -> None:
    w = SignalWindow()
    w.add(sample(10))
    with pytest.raises(ValueError):
        w.add(sample(5))
    w.add_queue(QueueSample(10, 0))
    with pytest.raises(ValueError):
        w.add_queue(QueueSample(9, 0))


@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 1e6)), min_size=2, max_size=30))
def test_rates_are_never_negative_and_match_a_monotone_counter(steps: list[tuple[float, float]]) -> None:
    w = SignalWindow(horizon_s=1e6, max_samples=64)
    t, total = 0.0, 0.0
    w.add(sample(t, gen=total))
    for dt, inc in steps:
        t += dt
        total += inc
        w.add(sample(t, gen=total))
    agg = w.snapshot(t).aggregate(t, t + 1)
    assert agg.generation_tps >= 0
    assert agg.generation_tps == pytest.approx(total / t, rel=1e-9, abs=1e-9)
