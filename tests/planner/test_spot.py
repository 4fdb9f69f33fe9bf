"""Spot traces: the reading of the SkyPilot intervals file, checked against rows read by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from skyfleet.cost.catalog import Catalog
from skyfleet.fleet.spec import ModelFleet
from skyfleet.planner.spot import SpotTrace, SpotTraceError, find_spot_trace, load_spot_traces, map_spot_pools
from tests.planner.shared_data import DATA

EAST_1A = "availability/1-node/aws-02-15-2023/us-east-1a_v100_1"


@pytest.fixture(scope="module")
def traces() -> dict[str, SpotTrace]:
    path = DATA / "spot_traces_skypilot_intervals.csv"
    assert path.exists(), f"shared data missing: {path}"
    return load_spot_traces(path)


def test_one_node_zero_means_available(traces: dict[str, SpotTrace]) -> None:
    # rows: 0-47970 value 0, 47970-48555 value 1, 48555-49725 value 0, 49725-51090 value 1
    t = traces[EAST_1A]
    assert t.available(0.0) and t.available(47969.0)
    assert not t.available(47970.0) and not t.available(48554.0)
    assert t.available(48555.0) and not t.available(49725.0)
    assert t.next_change(0.0) == 47970.0 and t.next_change(48000.0) == 48555.0
    assert t.period_s == 3930810.0
    assert t.availability == pytest.approx(0.833, abs=0.001)  # the README's mean value 0.17


def test_cyclic_wrap_merges_across_the_end(traces: dict[str, SpotTrace]) -> None:
    # last row 3921060-3930810 value 0 (available) and the first row is available too: the next change
    # after the wrap is the first row's end
    t = traces[EAST_1A]
    assert t.available(3925000.0) and t.available(3930810.0 + 10.0)
    assert t.next_change(3925000.0) == pytest.approx(3925000.0 + (3930810.0 - 3925000.0) + 47970.0)
    shifted = t.at(47000.0)
    assert shifted.available(0.0) and not shifted.available(970.0)
    assert shifted.next_change(0.0) == 970.0
    flat = t.at(3930000.0, cyclic=False)
    assert flat.available(10_000.0) and flat.next_change(10_000.0) == math.inf


def test_many_node_value_counts_instances(traces: dict[str, SpotTrace]) -> None:
    # rows: 0-900 value 0, 900-2100 value 3, 2100-3000 value 7: available once one instance is
    t = traces["availability/16-node/aws-08-27-2023/us-east-2b_v100_1"]
    assert not t.available(0.0) and t.available(900.0) and t.available(2500.0)
    assert t.next_change(0.0) == 900.0


def test_find_and_map(traces: dict[str, SpotTrace]) -> None:
    assert find_spot_trace("us-east-1a_v100_1", traces).name == EAST_1A
    with pytest.raises(SpotTraceError, match="ambiguous"):
        find_spot_trace("us-east-1", traces)
    with pytest.raises(SpotTraceError, match="no spot trace"):
        find_spot_trace("mars-1a", traces)
    cat = Catalog.builtin()
    pools = [{"name": n, "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": t, "max": 2}
             for n, t in (("s1", "spot"), ("s2", "spot"), ("od", "on-demand"))]
    f = ModelFleet.model_validate({"pools": pools}, context={"catalog": cat})
    auto = map_spot_pools(f, traces)
    assert set(auto) == {"s1", "s2"} and auto["s1"].zone != auto["s2"].zone
    assert auto["s1"].name == EAST_1A  # availability, 1-node, first by id
    with pytest.raises(SpotTraceError, match="ambiguous"):
        map_spot_pools(f, traces, "us-east-1f_v100_1")
    one = map_spot_pools(f, traces, "1-node/aws-02-15-2023/us-east-1f_v100_1", offset_s=100.0)
    assert {t.name for t in one.values()} == {"availability/1-node/aws-02-15-2023/us-east-1f_v100_1"}
    assert one["s1"].offset_s == 100.0


def test_bad_traces_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpotTraceError):
        SpotTrace("x", "z", starts=(1.0,), up=(True,), period_s=10.0)
    bad = tmp_path / "s.csv"
    bad.write_text("trace_id,kind\nx,availability\n")
    with pytest.raises(SpotTraceError, match="missing columns"):
        load_spot_traces(bad)
    assert SpotTrace.constant().available(1e9) and SpotTrace.constant().next_change(0.0) == math.inf
