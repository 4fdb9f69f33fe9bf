"""The fleet spec: the example loads; every bad input is rejected at load with the field named."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from skyfleet.config import ConfigError, load_settings
from skyfleet.cost.catalog import Catalog
from skyfleet.fleet.spec import load_fleet_spec, parse_fleet_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet-3-pools.yaml"


def base() -> dict[str, Any]:
    return {"models": {"m": {
        "on_demand_floor": 1,
        "pools": [
            {"name": "spot", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "spot", "max": 4},
            {"name": "od", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "on-demand",
             "min": 1, "max": 2},
        ],
        "schedules": [{"cron": "0 22 * * *", "timezone": "Europe/Paris", "min": 0, "max": 2}],
    }}}


def rejected(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_fleet_spec(data, Catalog.builtin())
    return str(info.value)


def test_the_example_loads_with_three_pools() -> None:
    spec = load_fleet_spec(EXAMPLE)
    (model,) = spec.models.values()
    assert [p.tier for p in model.pools] == ["spot", "on-demand", "spot"]
    assert model.on_demand_floor == 1 and model.max_replicas == 14 and len(model.schedules) == 2


def test_a_good_spec_loads_and_is_frozen() -> None:
    spec = parse_fleet_spec(base())
    m = spec.models["m"]
    assert (m.min_replicas, m.max_replicas) == (1, 6)
    with pytest.raises(Exception):
        m.on_demand_floor = 3  # type: ignore[misc]


@pytest.mark.parametrize(("path", "value", "field"), [
    (("pools", 0, "min"), 5, "models.m.pools[0]: min (5) is above max (4)"),
    (("pools", 1, "instance_type"), "g9z.huge", "models.m.pools[1]: instance_type: unknown instance type"),
    (("pools", 1, "region"), "mars-north-1", "models.m.pools[1]: region: instance type 'g6e.xlarge' is not"),
    (("pools", 0, "tier"), "preemptible", "models.m.pools[0].tier"),
    (("pools", 0, "name"), "Bad_Name", "models.m.pools[0].name: 'Bad_Name' must be a DNS label"),
    (("on_demand_floor",), 3, "models.m: on_demand_floor (3) is above the on-demand pools' max (2)"),
    (("schedules", 0, "cron"), "61 * * * *", "models.m.schedules[0].cron: invalid cron expression '61 * * * *'"),
    (("schedules", 0, "timezone"), "Europe/Atlantis", "models.m.schedules[0].timezone: unknown time zone"),
    (("schedules", 0, "min"), 3, "models.m.schedules[0]: min (3) is above max (2)"),
    (("schedules", 0, "max"), 9, "models.m: schedules[0].max (9) is above the pools' max (6)"),
    (("pools", 0, "max"), -1, "models.m.pools[0].max"),
    (("scale_to_zero_after_s",), 0, "models.m.scale_to_zero_after_s"),
    (("policy",), "magic", "models.m: policy: unknown policy 'magic'"),
    (("scaling",), {"target_utilisation": 0.4, "scale_down_utilisation": 0.6}, "models.m.scaling: scale_down"),
])
def test_bad_input_is_rejected_naming_the_field(path: tuple[Any, ...], value: Any, field: str) -> None:
    data = base()
    target = data["models"]["m"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert field in rejected(data)


def test_spot_pool_needs_a_spot_price_and_pools_need_distinct_names() -> None:
    catalog = Catalog.builtin()
    no_spot = next(t for t in catalog if t.spot_usd_per_hr is None)
    data = base()
    data["models"]["m"]["pools"][0].update(instance_type=no_spot.name, region=no_spot.region)
    assert "models.m.pools[0]: tier: the catalog has no spot price" in rejected(data)
    data = base()
    data["models"]["m"]["pools"][1]["name"] = "spot"
    assert "models.m: pools: duplicate pool names ['spot']" in rejected(data)
    data = base()
    data["models"]["m"]["pools"] = []
    assert "models.m.pools" in rejected(data)


def test_unknown_fields_are_rejected() -> None:
    data = base()
    data["models"]["m"]["pools"][0]["maxx"] = 3
    assert "models.m.pools[0].maxx" in rejected(data)


def test_load_names_the_file_for_unreadable_or_non_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_fleet_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_fleet_spec(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_fleet_spec(bad)
    bad.write_text("models:\n  m:\n    pools:\n      - {name: a, instance_type: g5.xlarge, region: us-east-1, "
                   "tier: on-demand, min: 3, max: 1}\n")
    with pytest.raises(ConfigError, match=r"fleet spec .*bad.yaml:\n  models.m.pools\[0\]: min \(3\) is above"):
        load_fleet_spec(bad)


def test_the_setting_names_the_spec_file(tmp_path: Path) -> None:
    assert load_settings(fleet_spec=EXAMPLE).fleet_spec == EXAMPLE
    assert load_settings().fleet_spec is None
    with pytest.raises(ConfigError, match=r"fleet_spec: .*file not found"):
        load_settings(fleet_spec=tmp_path / "nope.yaml")


def epoch(*args: int, tz: Any = UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def test_schedules_follow_their_time_zone_and_the_last_started_wins() -> None:
    from zoneinfo import ZoneInfo

    paris = ZoneInfo("Europe/Paris")
    data = base()
    data["models"]["m"]["schedules"] = [
        {"cron": "0 8 * * 1-5", "timezone": "Europe/Paris", "min": 2, "max": 6},
        {"cron": "0 20 * * *", "timezone": "Europe/Paris", "min": 0, "max": 1},
        {"cron": "0 12 * * *", "timezone": "Europe/Paris", "min": 4, "max": 6, "duration_s": 3600},
    ]
    m = parse_fleet_spec(data).models["m"]
    assert m.bounds(epoch(2025, 6, 2, 9, 0, tz=paris)) == (2, 6)  # Monday morning
    assert m.bounds(epoch(2025, 6, 2, 8, 0, tz=paris)) == (2, 6)  # exactly at the start
    assert m.bounds(epoch(2025, 6, 2, 7, 59, tz=paris)) == (0, 1)  # Sunday 20:00 still in force
    assert m.bounds(epoch(2025, 6, 2, 12, 30, tz=paris)) == (4, 6)  # lunch window
    assert m.bounds(epoch(2025, 6, 2, 13, 0, tz=paris)) == (2, 6)  # lunch over: back to the morning's
    assert m.bounds(epoch(2025, 6, 2, 21, 0, tz=paris)) == (0, 1)
    assert m.bounds(epoch(2025, 6, 7, 10, 0, tz=paris)) == (0, 1)  # Saturday: no morning start
    # The same instant in UTC: 20:00 in Paris in June is 18:00 UTC.
    assert m.bounds(epoch(2025, 6, 2, 18, 0)) == (0, 1)
    assert m.bounds(epoch(2025, 6, 2, 17, 59)) == (2, 6)


def test_without_a_schedule_in_force_bounds_are_the_pool_sums() -> None:
    data = copy.deepcopy(base())
    data["models"]["m"]["schedules"] = [{"cron": "0 12 * * *", "min": 0, "max": 1, "duration_s": 60}]
    m = parse_fleet_spec(data).models["m"]
    assert m.bounds(epoch(2025, 6, 2, 12, 0, 30)) == (0, 1)
    assert m.bounds(epoch(2025, 6, 2, 12, 1, 0)) == (1, 6)
