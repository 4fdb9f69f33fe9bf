"""The instance catalog: GPU instance types with their accelerators and $/hour, per cloud region.

Shipped with the package (``cost/data/catalog.csv``), built by ``scripts/build_catalog.py`` from the
public SkyPilot catalog (skypilot-org/skypilot-catalog, catalogs/v7, partial transcription; see
docs/cost.md). Prices can be overridden per instance type and region in the settings (negotiated
discounts, reserved instances).
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from importlib import resources

from skyfleet.config import ConfigError

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class InstanceType:
    cloud: str
    name: str
    region: str
    accelerator: str
    accelerator_count: int
    gpu_memory_gib: int
    vcpus: float
    memory_gib: float
    ondemand_usd_per_hr: float
    #: Median spot price across the region's zones; None where the catalog lists none.
    spot_usd_per_hr: float | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.region)

    @property
    def total_gpu_memory_gib(self) -> int:
        return self.gpu_memory_gib * self.accelerator_count


@dataclass(frozen=True, slots=True)
class PriceOverride:
    instance_type: str
    region: str
    ondemand_usd_per_hr: float | None = None
    spot_usd_per_hr: float | None = None


class Catalog:
    def __init__(self, types: Iterable[InstanceType]) -> None:
        self._types: dict[tuple[str, str], InstanceType] = {t.key: t for t in types}

    @classmethod
    def builtin(cls) -> Catalog:
        text = resources.files("skyfleet.cost").joinpath("data/catalog.csv").read_text()
        return cls(_parse(text))

    def __len__(self) -> int:
        return len(self._types)

    def __iter__(self) -> Iterator[InstanceType]:
        return iter(self._types.values())

    def get(self, name: str, region: str) -> InstanceType:
        """The instance type ``name`` in ``region``; :class:`ConfigError` listing the known ones if absent."""
        found = self._types.get((name, region))
        if found is not None:
            return found
        names = sorted({n for n, _ in self._types})
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown instance type '{name}'.{hint} Known: {', '.join(names)}")
        regions = sorted(r for n, r in self._types if n == name)
        raise ConfigError(f"instance type '{name}' is not in the catalog for region '{region}'. "
                          f"Known regions for it: {', '.join(regions)}")

    def with_overrides(self, overrides: Iterable[PriceOverride]) -> Catalog:
        types = dict(self._types)
        for o in overrides:
            base = self.get(o.instance_type, o.region)
            types[base.key] = replace(
                base,
                ondemand_usd_per_hr=o.ondemand_usd_per_hr if o.ondemand_usd_per_hr is not None
                else base.ondemand_usd_per_hr,
                spot_usd_per_hr=o.spot_usd_per_hr if o.spot_usd_per_hr is not None else base.spot_usd_per_hr)
        return Catalog(types.values())

    def with_local(self, ondemand_usd_per_hr: float, spot_usd_per_hr: float) -> Catalog:
        """This catalog plus the instance type ``local`` in region ``local``: a replica process on the
        gateway's own machine (the local provider), at the given prices."""
        local = InstanceType(cloud="local", name="local", region="local", accelerator="cpu", accelerator_count=0,
                             gpu_memory_gib=0, vcpus=2, memory_gib=4, ondemand_usd_per_hr=ondemand_usd_per_hr,
                             spot_usd_per_hr=spot_usd_per_hr)
        return Catalog([*self._types.values(), local])

    def cheapest(self, *, min_gpu_memory_gib: float, regions: Iterable[str] | None = None,
                 spot: bool = False) -> list[InstanceType]:
        """Instance types with at least this much GPU memory, cheapest first."""
        def price(t: InstanceType) -> float:
            return (t.spot_usd_per_hr if spot and t.spot_usd_per_hr is not None else t.ondemand_usd_per_hr)

        allowed = set(regions) if regions is not None else None
        fits = [t for t in self._types.values() if t.total_gpu_memory_gib >= min_gpu_memory_gib
                and (allowed is None or t.region in allowed) and (not spot or t.spot_usd_per_hr is not None)]
        return sorted(fits, key=lambda t: (price(t), t.name, t.region))


def _parse(text: str) -> list[InstanceType]:
    out = []
    for r in csv.DictReader(io.StringIO(text)):
        out.append(InstanceType(
            cloud=r["cloud"], name=r["instance_type"], region=r["region"], accelerator=r["accelerator"],
            accelerator_count=int(r["accelerator_count"]), gpu_memory_gib=int(r["gpu_memory_gib"]),
            vcpus=float(r["vcpus"]), memory_gib=float(r["memory_gib"]),
            ondemand_usd_per_hr=float(r["ondemand_usd_per_hr"]),
            spot_usd_per_hr=float(r["spot_usd_per_hr"]) if r["spot_usd_per_hr"] else None))
    return out
