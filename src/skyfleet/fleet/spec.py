"""The fleet spec: per model, the pools it may run in, its SLO, floor, schedules and scaling knobs.

Loaded from the YAML file named by the ``fleet_spec`` setting (see ``examples/fleet-3-pools.yaml``)::

    models:
      llama-3.1-8b:
        engine: vllm
        slo: {ttft_p95_s: 1.0, tpot_p95_s: 0.08}
        on_demand_floor: 1
        pools:
          - {name: l40s-spot, instance_type: g6e.xlarge, region: us-east-1, tier: spot, min: 0, max: 6}
          - ...
        schedules:
          - {cron: "0 22 * * *", timezone: Europe/Paris, min: 0, max: 2}

Everything is validated at load and a bad spec is rejected with the field named (``models.<m>.pools[i].min``):
``min`` above ``max``, an ``on_demand_floor`` above what the on-demand pools can hold, an instance type or
region missing from the instance catalog (or a spot pool whose type has no spot price), an invalid cron
expression or time zone, duplicate pool names.

Semantics used by the policies (:mod:`skyfleet.fleet.policy`):

* A pool's ``min``/``max`` bound its replicas; the model's total is bounded by the sums.
* A schedule fires at each time its cron expression matches (in its time zone); from then on its ``min``/``max``
  bound the model's *total* replicas (replacing the pools' minimums, never raising a pool above its ``max``),
  for ``duration_s`` if given, else until another schedule fires. The schedule that fired last wins.
* ``on_demand_floor``: the first replicas of the model (up to this many) are on-demand; replicas above the
  floor go to spot pools first, on-demand pools only when the spot pools are full.
* ``scale_to_zero_after_s``: after this long without any request the model goes to zero replicas (pool and
  schedule minimums apply only while it is awake); a request queued at the gateway wakes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from skyfleet.config import ConfigError, EngineKind

if TYPE_CHECKING:
    from skyfleet.cost.catalog import Catalog

__all__ = [
    "FleetSpec",
    "ModelFleet",
    "PoolSpec",
    "Scaling",
    "Schedule",
    "Slo",
    "load_fleet_spec",
    "parse_fleet_spec",
]

Tier = Literal["spot", "on-demand"]
_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Slo(BaseModel):
    model_config = _FROZEN

    ttft_p95_s: float = Field(2.0, gt=0, description="Target 95th percentile time to first token, seconds.")
    tpot_p95_s: float = Field(
        0.1, gt=0, description="Target 95th percentile time per output token (inter-token latency), seconds.")


class Schedule(BaseModel):
    model_config = _FROZEN

    cron: str = Field(description="When the window starts: a cron expression (5 fields, or croniter's 6 with "
                      "seconds), evaluated in `timezone`.")
    timezone: str = Field("UTC", description="IANA time zone of `cron`, e.g. Europe/Paris.")
    min: int = Field(ge=0, description="Fewest replicas of the model (all pools together) while active.")
    max: int = Field(ge=0, description="Most replicas of the model (all pools together) while active.")
    duration_s: float | None = Field(
        None, gt=0, description="How long the window lasts after each start; None: until another schedule starts.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not croniter.is_valid(v):
            raise ValueError(f"invalid cron expression {v!r}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like Europe/Paris)") from None
        return v

    @model_validator(mode="after")
    def _bounds(self) -> Schedule:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self

    def last_start(self, now: float) -> float:
        """Epoch seconds of the latest start at or before ``now`` (epoch seconds)."""
        # croniter's get_prev is strictly before its start: start just after ``now`` so that a
        # window starting exactly at ``now`` counts.
        it = croniter(self.cron, datetime.fromtimestamp(math.floor(now) + 1, ZoneInfo(self.timezone)))
        start = float(it.get_prev(float))
        return start if start <= now else float(it.get_prev(float))


class PoolSpec(BaseModel):
    model_config = _FROZEN

    name: str = Field(description="Pool name, unique within the model; a DNS label (lower case, digits, '-').")
    instance_type: str = Field(description="Instance type from the instance catalog, e.g. g6e.xlarge.")
    region: str = Field(description="Cloud region of the instance type, e.g. us-east-1.")
    tier: Tier = Field(description="Capacity tier: spot (preemptible, cheaper) or on-demand.")
    min: int = Field(0, ge=0, description="Fewest replicas in this pool (while no schedule is active).")
    max: int = Field(ge=0, description="Most replicas in this pool.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Engine arguments for this pool, merged over the model's.")
    tokens_per_s: float | None = Field(
        None, gt=0, description="Nominal generated tokens/s of one replica at the SLO (the engine profile); "
        "None: learned from the observed window. Used for capacity and $ per served token.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _POOL_NAME.match(v):
            raise ValueError(f"{v!r} must be a DNS label: 1-40 of a-z, 0-9 and '-', starting and "
                             "ending with a letter or digit")
        return v

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> PoolSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        catalog = (info.context or {}).get("catalog")
        if catalog is not None:
            try:
                found = catalog.get(self.instance_type, self.region)
            except ConfigError as exc:
                field = "instance_type" if str(exc).startswith("unknown instance type") else "region"
                raise ValueError(f"{field}: {exc}") from None
            if self.tier == "spot" and found.spot_usd_per_hr is None:
                raise ValueError(f"tier: the catalog has no spot price for {self.instance_type} in {self.region}")
        return self


class Scaling(BaseModel):
    model_config = _FROZEN

    window_s: float = Field(60.0, gt=0, description="Signals are averaged over this many recent seconds.")
    up_stabilisation_s: float = Field(
        30.0, ge=0, description="Scale up only after the need for more replicas has held this long.")
    down_stabilisation_s: float = Field(
        300.0, ge=0, description="Scale down only after the need for fewer replicas has held this long.")
    cooldown_s: float = Field(120.0, ge=0, description="Least time between two changes of direction.")
    max_step_up: int = Field(4, ge=1, description="Most replicas added by one decision.")
    max_step_down: int = Field(1, ge=1, description="Most replicas removed by one decision.")
    target_utilisation: float = Field(
        0.7, gt=0, le=1, description="Size the fleet so that demand is this fraction of its token capacity.")
    scale_down_utilisation: float = Field(
        0.5, gt=0, le=1, description="Consider fewer replicas only below this utilisation.")

    @model_validator(mode="after")
    def _check(self) -> Scaling:
        if self.scale_down_utilisation > self.target_utilisation:
            raise ValueError(f"scale_down_utilisation ({self.scale_down_utilisation}) is above "
                             f"target_utilisation ({self.target_utilisation})")
        return self


class ModelFleet(BaseModel):
    model_config = _FROZEN

    pools: tuple[PoolSpec, ...] = Field(min_length=1, description="Pools the model may run in.")
    slo: Slo = Field(default_factory=Slo, description="Latency objective the fleet is sized for.")
    on_demand_floor: int = Field(
        0, ge=0, description="The first this many replicas are on-demand; above it spot pools are filled first.")
    schedules: tuple[Schedule, ...] = Field((), description="Time windows with their own total min/max.")
    scale_to_zero_after_s: float | None = Field(
        None, gt=0, description="Go to zero replicas after this long idle; None: never below the minimums.")
    engine: EngineKind = Field("llama", description="Engine of the replicas: llama, vllm, sglang or sim.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Engine arguments for every pool.")
    scaling: Scaling = Field(default_factory=Scaling, description="Autoscaling knobs.")
    policy: str = Field("default", description="Name of the scaling policy (skyfleet.fleet.policy).")

    @model_validator(mode="after")
    def _check(self) -> ModelFleet:
        names = [p.name for p in self.pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pools: duplicate pool names {dup}")
        on_demand_max = sum(p.max for p in self.pools if p.tier == "on-demand")
        if self.on_demand_floor > on_demand_max:
            raise ValueError(f"on_demand_floor ({self.on_demand_floor}) is above the on-demand pools' max "
                             f"({on_demand_max})")
        total_max = self.max_replicas
        for i, s in enumerate(self.schedules):
            if s.max > total_max:
                raise ValueError(f"schedules[{i}].max ({s.max}) is above the pools' max ({total_max})")
        from skyfleet.fleet.policy import policy_names

        if self.policy not in policy_names():
            raise ValueError(f"policy: unknown policy {self.policy!r}; known: {', '.join(policy_names())}")
        return self

    @property
    def min_replicas(self) -> int:
        return sum(p.min for p in self.pools)

    @property
    def max_replicas(self) -> int:
        return sum(p.max for p in self.pools)

    def pool(self, name: str) -> PoolSpec:
        return next(p for p in self.pools if p.name == name)

    def active_schedule(self, now: float) -> Schedule | None:
        """The schedule in force at ``now`` (epoch seconds): the one that started last and has not ended."""
        best: tuple[float, int] | None = None
        for i, s in enumerate(self.schedules):
            start = s.last_start(now)
            if s.duration_s is not None and now - start >= s.duration_s:
                continue
            if best is None or start > best[0]:
                best = (start, i)
        return self.schedules[best[1]] if best is not None else None

    def bounds(self, now: float) -> tuple[int, int]:
        """(min, max) total replicas at ``now``: the active schedule's, else the pools' sums."""
        s = self.active_schedule(now)
        return (s.min, s.max) if s is not None else (self.min_replicas, self.max_replicas)


class FleetSpec(BaseModel):
    model_config = _FROZEN

    models: dict[str, ModelFleet] = Field(description="Fleet of each model, by the name clients use.")


def parse_fleet_spec(data: Mapping[str, Any], catalog: Catalog | None = None, *, source: str = "fleet spec") \
        -> FleetSpec:
    """Validate a fleet spec; instance types and regions against ``catalog`` (the built-in one if None)."""
    if catalog is None:
        from skyfleet.cost.catalog import Catalog

        catalog = Catalog.builtin()
    try:
        return FleetSpec.model_validate(data, context={"catalog": catalog})
    except ValidationError as exc:
        lines = [f"  {_where(err['loc'])}: {_msg(err)}" for err in exc.errors()]
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_fleet_spec(path: Path, catalog: Catalog | None = None) -> FleetSpec:
    """Read and validate a fleet spec YAML file; :class:`ConfigError` naming the field if it is bad."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"fleet spec {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"fleet spec {path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"fleet spec {path}: expected a mapping with 'models'")
    return parse_fleet_spec(data, catalog, source=f"fleet spec {path}")


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _msg(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")
