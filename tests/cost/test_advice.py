"""Right-sizing advice: golden recommendations for hand-made utilisation summaries (numbers worked out by
hand below, prices from the built-in catalog), "nothing to advise", and the sample folding."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from skyfleet.cost.advice import (
    HOURS_PER_MONTH,
    AdviceSettings,
    PoolUtilisation,
    ReplicaUse,
    SampleFolder,
    UtilisationSummary,
    advise,
    estimate_weights_gib,
    summarise,
)
from skyfleet.cost.catalog import Catalog
from skyfleet.state.cost_queries import IntervalRow, SampleRow

NOW = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
DAY = UtilisationSummary(start=NOW - timedelta(hours=24), end=NOW, pools=())


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.builtin()


def replicas(n: int, itype: str | None, price: float, tier: str = "on-demand", region: str | None = "us-east-1",
             hours: float = 24.0) -> tuple[ReplicaUse, ...]:
    return tuple(ReplicaUse(f"gw/r{i}", itype, region, tier, price, hours, True) for i in range(n))


def pool(name: str, reps: tuple[ReplicaUse, ...], **kw: object) -> PoolUtilisation:
    base = dict(model="llama-3.1-8b-instruct", idle_fraction=0.2, idle_source="attribution",
                peak_kv_cache_usage=0.5, peak_busy_replicas=len(reps) * 0.95, median_busy_replicas=len(reps) * 0.8,
                peak_concurrency=None, peak_waiting=0.0, max_running_per_replica=None, samples=1440)
    base.update(kw)
    return PoolUtilisation(pool=name, replicas=reps, **base)  # type: ignore[arg-type]


def test_nothing_to_advise(catalog: Catalog) -> None:
    busy_local = pool("local", replicas(2, None, 0.5, tier="local", region=None), peak_busy_replicas=1.9)
    # A busy on-demand pool on the cheapest type that fits: no cheaper type, no spare replicas, median load
    # needs every replica (no spot share).
    busy_cloud = pool("cloud", replicas(2, "g6.xlarge", 0.8048), peak_kv_cache_usage=0.9,
                      peak_busy_replicas=1.7, median_busy_replicas=1.6)
    assert advise(replace(DAY, pools=(busy_local, busy_cloud)), catalog, now=NOW) == []
    assert advise(DAY, catalog, now=NOW) == []


def test_golden_over_provisioned_on_demand_pool(catalog: Catalog) -> None:
    # 4 x g5.12xlarge (4 x A10G, 96 GiB, $5.672/h on demand in us-east-1) serving an 8B model in fp16.
    p = pool("chat", replicas(4, "g5.12xlarge", 5.672), idle_fraction=0.78, peak_kv_cache_usage=0.10,
             peak_busy_replicas=1.1, median_busy_replicas=0.5, peak_concurrency=6.0, max_running_per_replica=4.0)
    recs = advise(replace(DAY, pools=(p,)), catalog, now=NOW)
    assert [r.kind for r in recs] == ["over_provisioned", "fewer_replicas", "cheaper_instance", "spot_mix"]
    flag, fewer, cheaper, spot = recs

    # cost 4 x 5.672 x 24 = 544.512; idle 78 % of it = 424.72
    assert flag.summary == "pool chat was idle 78% of the last 24 h ($424.72 of $544.51)"
    assert flag.monthly_saving_usd is None and flag.proposed is None
    assert flag.detail["idle_usd"] == pytest.approx(424.71936)

    # ceil(1.1 x 1.25) = 2 and ceil(6 x 1.25 / 4) = 2 replicas: 2 removed, 2 x 5.672 x 730 = 8281.12
    assert fewer.monthly_saving_usd == pytest.approx(8281.12)
    assert fewer.current == "4 x g5.12xlarge on-demand ($22.69/h)"
    assert fewer.proposed == "2 x g5.12xlarge on-demand ($11.34/h)"
    assert fewer.summary.startswith("pool chat: 2 replica(s) instead of 4")

    # weights 8e9 x 2 B = 14.90 GiB; KV cache = 0.9 x 96 - 14.90 = 71.50 GiB, 10 % used, +25 %: 8.94 GiB;
    # (14.90 + 8.94) / 0.9 = 26.49 GiB -> cheapest us-east-1 type with that much: g6e.xlarge (48 GiB, $1.861/h)
    assert cheaper.detail["memory_needed_gib"] == pytest.approx(26.49, abs=0.01)
    assert cheaper.detail["proposed_instance_type"] == "g6e.xlarge"
    assert cheaper.monthly_saving_usd == pytest.approx((5.672 - 1.861) * 4 * HOURS_PER_MONTH)  # 11128.12
    assert cheaper.proposed == "4 x g6e.xlarge on-demand ($7.44/h)"
    assert any("estimated from the model name" in a for a in cheaper.assumptions)

    # floor ceil(0.5 x 1.25) = 1 on demand; 3 on spot at $2.5445/h: 3 x (5.672 - 2.5445) x 730 = 6849.23
    assert spot.detail == {"on_demand": 1, "spot": 3, "instance_type": "g5.12xlarge", "region": "us-east-1",
                           "usd_per_hour": 5.672, "spot_usd_per_hour": 2.5445}
    assert spot.monthly_saving_usd == pytest.approx(6849.225)
    assert spot.json()["monthly_saving_usd"] == pytest.approx(6849.22, abs=0.011)
    assert spot.proposed == "1 x g5.12xlarge on-demand + 3 x g5.12xlarge spot ($13.31/h)"


def test_golden_spot_pool_with_unknown_model_and_a_queue(catalog: Catalog) -> None:
    # 2 x g6e.xlarge spot (48 GiB, $0.8171/h), a model whose size the name does not tell; requests queued.
    p = pool("batch", replicas(2, "g6e.xlarge", 0.8171, tier="spot"), model="house-model", idle_fraction=0.3,
             peak_kv_cache_usage=0.3, peak_busy_replicas=0.4, median_busy_replicas=0.2, peak_waiting=3.0)
    recs = advise(replace(DAY, pools=(p,)), catalog, now=NOW)
    # queued: no fewer replicas; spot already: no spot mix; idle 30 %: no flag.
    assert [r.kind for r in recs] == ["cheaper_instance"]
    (rec,) = recs
    # 48 GiB x 0.3 x 1.25 = 18 GiB -> cheapest spot type in us-east-1 with 18 GiB: g5.xlarge ($0.4028/h)
    assert rec.detail["memory_needed_gib"] == pytest.approx(18.0)
    assert rec.detail["proposed_instance_type"] == "g5.xlarge"
    assert rec.monthly_saving_usd == pytest.approx((0.8171 - 0.4028) * 2 * HOURS_PER_MONTH)  # 604.88
    assert any("model size unknown" in a for a in rec.assumptions)


def test_thin_evidence_only_flags(catalog: Catalog) -> None:
    p = pool("new", replicas(3, "g5.xlarge", 1.006), idle_fraction=0.9, idle_source="samples", samples=3,
             peak_busy_replicas=0.1, median_busy_replicas=0.05, peak_kv_cache_usage=None)
    recs = advise(replace(DAY, pools=(p,)), catalog, now=NOW + timedelta(hours=5))
    assert [r.kind for r in recs] == ["over_provisioned"]
    assert recs[0].summary.startswith("pool new was idle 90% of the 24 h to 2026-11-02 12:00 UTC")
    assert recs[0].assumptions == ("idle share from the samples",)


def test_settings_and_gone_replicas(catalog: Catalog) -> None:
    gone = ReplicaUse("gw/old", "g5.xlarge", "us-east-1", "on-demand", 1.006, 12.0, False)
    p = pool("p", (*replicas(2, "g5.xlarge", 1.006), gone), idle_fraction=0.6, peak_busy_replicas=0.5,
             median_busy_replicas=0.5, peak_kv_cache_usage=0.99)
    recs = advise(replace(DAY, pools=(p,)), catalog, now=NOW)
    fewer = next(r for r in recs if r.kind == "fewer_replicas")
    assert fewer.detail["replicas"] == 2  # the stopped replica is not part of the current configuration
    assert fewer.monthly_saving_usd == pytest.approx(1.006 * HOURS_PER_MONTH)
    strict = AdviceSettings(idle_threshold=0.95, min_monthly_saving_usd=10_000)
    assert advise(replace(DAY, pools=(p,)), catalog, now=NOW, settings=strict) == []


@pytest.mark.parametrize(("name", "gib"), [
    ("smollm2-135m-instruct", 135e6 * 2 / 2**30), ("llama-3.1-8b-instruct", 8e9 * 2 / 2**30),
    ("mixtral-8x7b", 56e9 * 2 / 2**30), ("qwen2.5-0.5b-instruct-q4_k_m", 0.5e9 * 0.57 / 2**30),
    ("llama-3.1-70b-instruct-awq", 70e9 * 0.57 / 2**30), ("Qwen3-32B-FP8", 32e9 * 1.06 / 2**30),
    ("gpt-4o", None), ("phi-3-mini-4k", None), ("house-model", None)])
def test_weights_from_model_names(name: str, gib: float | None) -> None:
    got = estimate_weights_gib(name)
    assert got == (None if gib is None else pytest.approx(gib))


def test_summarise_from_intervals_and_samples() -> None:
    start, end = NOW - timedelta(hours=1), NOW
    intervals = [
        IntervalRow("i0", "gw", "local-0", "p", "m-1b", "llamacpp", None, None, "local", 0.5,
                    start - timedelta(hours=1), None, NOW),
        IntervalRow("i1", "gw", "local-1", "p", "m-1b", "llamacpp", None, None, "local", 0.5,
                    start + timedelta(minutes=30), start + timedelta(minutes=45), start + timedelta(minutes=45)),
    ]

    def sample(rep: str, minute: float, busy: float, running: float, waiting: float, kv: float) -> SampleRow:
        return SampleRow("gw", rep, start + timedelta(minutes=minute), "p", running, waiting, kv, busy, 10.0)

    folder = SampleFolder()
    folder.add([sample("local-0", 0, 0.2, 1, 0, 0.1), sample("local-0", 0.5, 0.6, 3, 0, 0.2)])
    folder.add([sample("local-0", 31, 0.5, 2, 0, 0.3), sample("local-1", 31.2, 0.7, 2, 1, 0.4),
                sample("local-0", 50, 0.0, 0, 0, 0.05)])
    with pytest.raises(ValueError, match="time order"):
        folder.add([sample("local-0", 10, 0, 0, 0, 0)])
    s = summarise(intervals, folder.finish(), start=start, end=end, now=NOW)
    (p,) = s.pools
    assert [(r.replica_id, r.hours, r.running) for r in p.replicas] == [("gw/local-0", 1.0, True),
                                                                       ("gw/local-1", 0.25, False)]
    assert p.cost_usd == pytest.approx(0.625)
    # minute 0: local-0 at its highest (0.6 busy, 3 running); minute 31: 0.5 + 0.7, 2 + 3; minute 50: 0, 0
    assert p.peak_busy_replicas == pytest.approx(1.2) and p.median_busy_replicas == pytest.approx(0.6)
    assert p.peak_concurrency == 5 and p.peak_waiting == 1 and p.max_running_per_replica == 3
    assert p.peak_kv_cache_usage == pytest.approx(0.4) and p.samples == 5
    assert p.idle_source == "samples" and p.idle_fraction == pytest.approx(1 - 2.0 / 5)
    with_idle = summarise(intervals, {}, start=start, end=end, now=NOW, idle={"p": (0.5, 0.625)})
    assert with_idle.pools[0].idle_fraction == pytest.approx(0.8) and with_idle.pools[0].idle_source == "attribution"
    assert with_idle.pools[0].samples == 0 and with_idle.pools[0].peak_busy_replicas is None


def test_small_amounts_keep_their_digits(catalog: Catalog) -> None:
    # Two local replicas at $0.085/h for half an hour, 96 % idle: cents, not "$0.00 of $0.00".
    p = pool("local", replicas(2, None, 0.085, tier="local", region=None, hours=0.5), idle_fraction=0.96,
             samples=2)
    (flag,) = advise(replace(DAY, pools=(p,)), catalog, now=NOW)
    assert flag.summary == "pool local was idle 96% of the last 24 h ($0.0816 of $0.0850)"
