"""The shipped instance catalog: built from the SkyPilot catalog CSVs, looked up with clear errors."""

from __future__ import annotations

import pytest

from skyfleet.config import ConfigError
from skyfleet.cost.catalog import Catalog, PriceOverride


def test_known_prices_from_the_public_catalog() -> None:
    c = Catalog.builtin()
    g5 = c.get("g5.xlarge", "us-east-1")  # README of the data: $1.006/h on-demand, $0.397-0.418 spot
    assert (g5.accelerator, g5.accelerator_count, g5.gpu_memory_gib) == ("A10G", 1, 24)
    assert g5.ondemand_usd_per_hr == pytest.approx(1.006)
    assert 0.397 <= (g5.spot_usd_per_hr or 0) <= 0.418
    p5 = c.get("p5.48xlarge", "us-east-1")  # $98.32/h on-demand, spot $20.99-30.33
    assert p5.ondemand_usd_per_hr == pytest.approx(98.32) and 20.99 <= (p5.spot_usd_per_hr or 0) <= 30.33
    assert p5.total_gpu_memory_gib == 640
    # GCP: host VM + accelerator bundle in the same zone.
    a3 = c.get("a3-highgpu-1g", "us-west1")
    assert a3.accelerator == "H100" and a3.ondemand_usd_per_hr > 4.2
    assert all(t.spot_usd_per_hr is None or t.spot_usd_per_hr < t.ondemand_usd_per_hr * 1.05 for t in c)


def test_unknown_type_or_region_lists_the_known_ones() -> None:
    c = Catalog.builtin()
    with pytest.raises(ConfigError, match=r"unknown instance type 'g5.xlarg'.*Did you mean g5.xlarge.*Known: "):
        c.get("g5.xlarg", "us-east-1")
    with pytest.raises(ConfigError, match=r"region 'mars-1'.*Known regions for it: eu-west-1, us-east-1"):
        c.get("g5.xlarge", "mars-1")


def test_overrides_replace_prices() -> None:
    c = Catalog.builtin().with_overrides([PriceOverride("g5.xlarge", "us-east-1", ondemand_usd_per_hr=0.70)])
    assert c.get("g5.xlarge", "us-east-1").ondemand_usd_per_hr == 0.70
    assert c.get("g5.xlarge", "us-east-1").spot_usd_per_hr is not None
    with pytest.raises(ConfigError):
        Catalog.builtin().with_overrides([PriceOverride("nope", "us-east-1", ondemand_usd_per_hr=1)])


def test_cheapest_fit() -> None:
    c = Catalog.builtin()
    fits = c.cheapest(min_gpu_memory_gib=70, regions=["us-east-1"])
    assert fits and all(t.total_gpu_memory_gib >= 70 and t.region == "us-east-1" for t in fits)
    prices = [t.ondemand_usd_per_hr for t in fits]
    assert prices == sorted(prices)
