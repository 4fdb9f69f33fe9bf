"""The planner: the cheapest mix of instance types per time window that serves a trace at its SLO.

Three steps, each a pure function of data:

1. :func:`demand_windows` cuts a :class:`~skyfleet.planner.types.Trace` into windows of ``window_s``
   seconds. A window's demand is its **peak** rate over sub-intervals of ``peak_s`` seconds (requests,
   output tokens and prompt tokens per second, each at its own peak): a fleet sized for a window's mean
   would miss the SLO during its busiest minute.
2. :func:`options_for` lists where a replica can run: each instance type of the catalog (in the given
   regions) with an engine profile for the model, whose replica meets the SLO
   (:func:`~skyfleet.planner.capacity.replica_capacity`), once per tier (spot where the catalog has a spot
   price, on-demand). Options no better than another of the same tier (no more capacity, no lower price)
   are dropped. Types that cannot meet the SLO come back as lines with their best TTFT/TPOT.
3. :func:`solve` picks integer replica counts ``n_o >= 0`` per window, minimising
   ``sum(n_o * usd_per_hour_o) * window_hours`` subject to, with ``h`` the headroom:

   * ``sum(n_o * requests_per_s_o) >= h * peak requests/s`` and likewise output tokens/s and prompt tokens/s
     (capacity per option: :class:`~skyfleet.planner.capacity.ReplicaCapacity`; the prompt constraint
     catches windows whose prompts are longer than those the capacities were computed for);
   * on-demand replicas ``>= on_demand_floor`` (in every window, idle ones included);
   * spot requests/s capacity ``<= spot_max_fraction`` of the total capacity, if given;
   * ``n_o <= max_count``, if given.

   Windows are independent (nothing couples them), so there is **one small MILP per window**
   (``scipy.optimize.milp``, HiGHS), windows with the same demand solved once. A window without demand
   gets no replica (bar the floor).

:func:`plan_to_fleet_spec` turns a plan into a fleet spec mapping (see its docstring for the mapping).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from skyfleet.fleet.spec import Slo
from skyfleet.planner.capacity import ReplicaCapacity, replica_capacity
from skyfleet.planner.types import EngineProfile, Trace

if TYPE_CHECKING:
    from skyfleet.cost.catalog import Catalog, InstanceType

__all__ = [
    "Option",
    "Plan",
    "PlanError",
    "ProfileSource",
    "WindowDemand",
    "demand_windows",
    "options_for",
    "plan_to_fleet_spec",
    "prune_dominated",
    "single_option_cost",
    "solve",
]

Tier = Literal["spot", "on-demand"]
DAY_S = 86_400.0


class PlanError(ValueError):
    """A planning problem that has no answer (no option, a floor without on-demand options, bad inputs)."""


class ProfileSource(Protocol):
    """What :func:`options_for` needs of a profile book (``skyfleet.planner.profiles.ProfileBook``)."""

    def for_instance(self, instance_type: InstanceType, model: str, engine: str) -> EngineProfile | None: ...


@dataclass(frozen=True, slots=True)
class Option:
    """One (instance type, region, tier) a replica can run on, with its price and capacity."""

    instance_type: str
    region: str
    tier: Tier
    usd_per_hour: float
    profile: EngineProfile
    capacity: ReplicaCapacity
    max_count: int | None = None
    #: accelerators billed per replica (the instance's); None: ``profile.gpus``
    gpus: int | None = None

    @property
    def gpus_per_replica(self) -> int:
        return self.gpus if self.gpus is not None else self.profile.gpus

    @property
    def label(self) -> str:
        return f"{self.instance_type} {self.region} {self.tier}"

    @property
    def usd_per_million_tokens(self) -> float:
        """$ per million output tokens at full SLO load."""
        return self.usd_per_hour / (self.capacity.output_tokens_per_s * 3600.0) * 1e6


@dataclass(frozen=True, slots=True)
class WindowDemand:
    """The demand of one window ``[start_s, end_s)`` of a trace: its peak rates (see :func:`demand_windows`)."""

    start_s: float
    end_s: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    requests: int = 0  # in the window

    @property
    def hours(self) -> float:
        return (self.end_s - self.start_s) / 3600.0

    @property
    def empty(self) -> bool:
        return self.requests_per_s <= 0 and self.output_tokens_per_s <= 0 and self.prompt_tokens_per_s <= 0


@dataclass(frozen=True)
class Plan:
    """Replicas per window and option (``counts[w][option index]``), with what they cost.

    ``status``: ``optimal`` (every window solved to optimality), ``feasible`` (a window stopped at the time
    limit with a solution) or ``infeasible`` (some window has no solution: see ``notes``; its counts are
    empty).
    """

    counts: tuple[dict[int, int], ...]
    window_cost_usd: tuple[float, ...]
    window_status: tuple[str, ...]
    cost_usd: float
    gpu_hours: float
    status: str
    solve_s: float
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status != "infeasible"

    def replicas(self, window: int) -> int:
        return sum(self.counts[window].values())

    def peak(self, option: int) -> int:
        """Most replicas of ``option`` in any window."""
        return max((c.get(option, 0) for c in self.counts), default=0)

    def least(self, option: int) -> int:
        """Fewest replicas of ``option`` in any window."""
        return min((c.get(option, 0) for c in self.counts), default=0)

    def used(self) -> list[int]:
        """Indices of the options with a replica in some window, in index order."""
        return sorted({i for c in self.counts for i, n in c.items() if n > 0})


# -- 1. demand ---------------------------------------------------------------------------------------------


def demand_windows(trace: Trace, window_s: float, *, peak_s: float = 60.0) -> list[WindowDemand]:
    """Per window of ``window_s`` seconds from the trace's start, its peak demand.

    Each window is cut into sub-intervals of ``peak_s`` seconds (the last one shorter if ``peak_s`` does not
    divide ``window_s``; ``peak_s`` is capped at ``window_s``); a window's requests/s, output tokens/s and
    prompt tokens/s are each the maximum over its sub-intervals (so they may come from different minutes:
    conservative). The means are over the window's requests (0 for an empty window). The windows cover
    the trace up to its last arrival; the last one is as long as the others.
    """
    if not (window_s > 0 and math.isfinite(window_s)):
        raise PlanError(f"window must be a positive number of seconds, not {window_s!r}")
    if not (peak_s > 0 and math.isfinite(peak_s)):
        raise PlanError(f"peak interval must be a positive number of seconds, not {peak_s!r}")
    if len(trace) == 0:
        return []
    peak_s = min(peak_s, window_s)
    arrival = np.asarray(trace.arrival_s, dtype=np.float64)
    prompt = np.asarray(trace.prompt_tokens, dtype=np.float64)
    output = np.asarray(trace.output_tokens, dtype=np.float64)
    n_win = int(arrival[-1] // window_s) + 1
    n_sub = math.ceil(window_s / peak_s - 1e-9)
    win = np.minimum((arrival // window_s).astype(np.int64), n_win - 1)
    sub = np.minimum(((arrival - win * window_s) // peak_s).astype(np.int64), n_sub - 1)
    cell = win * n_sub + sub
    size = n_win * n_sub
    lengths = np.full(n_sub, peak_s)
    lengths[-1] = window_s - peak_s * (n_sub - 1)

    def peak(weights: np.ndarray | None) -> np.ndarray:
        per_cell = np.bincount(cell, weights=weights, minlength=size).reshape(n_win, n_sub)
        return (per_cell / lengths).max(axis=1)

    requests = np.bincount(win, minlength=n_win)
    prompt_sum = np.bincount(win, weights=prompt, minlength=n_win)
    output_sum = np.bincount(win, weights=output, minlength=n_win)
    rps, ops, pps = peak(None), peak(output), peak(prompt)
    out = []
    for w in range(n_win):
        k = int(requests[w])
        out.append(WindowDemand(
            start_s=w * window_s, end_s=(w + 1) * window_s, requests_per_s=float(rps[w]),
            output_tokens_per_s=float(ops[w]), prompt_tokens_per_s=float(pps[w]),
            mean_prompt_tokens=float(prompt_sum[w] / k) if k else 0.0,
            mean_output_tokens=float(output_sum[w] / k) if k else 0.0, requests=k))
    return out


# -- 2. options --------------------------------------------------------------------------------------------


def options_for(model: str, slo: Slo, catalog: Catalog, profiles: ProfileSource, *,
                regions: Iterable[str] | None = None, engine: str = "vllm", mean_prompt_tokens: float,
                mean_output_tokens: float, p95_prompt_tokens: float | None = None,
                tiers: Sequence[Tier] = ("spot", "on-demand"), prefill_interference: float = 1.0,
                prune: bool = True) -> tuple[list[Option], list[str]]:
    """Options for ``model`` at ``slo``, and one line per instance type (with a profile) that misses the SLO.

    Instance types without a profile for the model are left out silently (nothing is known about them).
    ``prune``: drop options dominated within their tier (see :func:`prune_dominated`).
    """
    allowed = set(regions) if regions is not None else None
    bad_tiers = set(tiers) - {"spot", "on-demand"}
    if bad_tiers:
        raise PlanError(f"unknown tier(s) {sorted(bad_tiers)}: use spot and/or on-demand")
    options: list[Option] = []
    infeasible: dict[str, str] = {}
    capacities: dict[EngineProfile, ReplicaCapacity] = {}
    for t in sorted(catalog, key=lambda t: (t.name, t.region)):
        if allowed is not None and t.region not in allowed:
            continue
        profile = profiles.for_instance(t, model, engine)
        if profile is None:
            continue
        cap = capacities.get(profile)
        if cap is None:
            cap = capacities[profile] = replica_capacity(
                profile, slo, mean_prompt_tokens=mean_prompt_tokens, mean_output_tokens=mean_output_tokens,
                p95_prompt_tokens=p95_prompt_tokens, prefill_interference=prefill_interference)
        if not cap.meets_slo:
            infeasible.setdefault(t.name, f"{t.name} ({t.accelerator_count}x {t.accelerator}, "
                                          f"{profile.gpus} GPU/replica): {cap.why}")
            continue
        for tier in tiers:
            price = t.spot_usd_per_hr if tier == "spot" else t.ondemand_usd_per_hr
            if price is None:
                continue
            options.append(Option(instance_type=t.name, region=t.region, tier=tier, usd_per_hour=price,
                                  profile=profile, capacity=cap, gpus=t.accelerator_count))
    if allowed is not None:
        known = {t.region for t in catalog}
        unknown = sorted(allowed - known)
        if unknown:
            raise PlanError(f"region(s) not in the instance catalog: {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
    if prune:
        options = prune_dominated(options)
    return options, [infeasible[k] for k in sorted(infeasible)]


def prune_dominated(options: Sequence[Option]) -> list[Option]:
    """Options not dominated by another of the same tier (as cheap or cheaper, at least as much capacity in
    requests, output and prompt tokens/s, strictly better in one, no count limit), in their order.

    A dominated option can always be swapped for its dominator at no extra cost, so dropping it changes no
    optimal cost; of exact ties, the first is kept.
    """
    def vec(o: Option) -> tuple[float, float, float, float]:
        c = o.capacity
        return (-o.usd_per_hour, c.requests_per_s, c.output_tokens_per_s,
                c.prompt_tokens_per_s if c.prompt_tokens_per_s is not None else math.inf)

    keep = []
    for i, o in enumerate(options):
        v = vec(o)
        dominated = False
        for j, other in enumerate(options):
            if j == i or other.tier != o.tier or other.max_count is not None:
                continue
            u = vec(other)
            if all(a >= b for a, b in zip(u, v, strict=True)) and (u != v or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(o)
    return keep


# -- 3. the integer program --------------------------------------------------------------------------------


def solve(demands: Sequence[WindowDemand], options: Sequence[Option], *, on_demand_floor: int = 0,
          headroom: float = 1.0, spot_max_fraction: float | None = None, time_limit_s: float = 10.0) -> Plan:
    """The cheapest replica counts per window (see the module docstring for the program)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not options:
        raise PlanError("no option to plan with: no instance type meets the SLO (or none has a profile)")
    if on_demand_floor < 0:
        raise PlanError(f"on_demand_floor must be >= 0, not {on_demand_floor}")
    if not (headroom > 0 and math.isfinite(headroom)):
        raise PlanError(f"headroom must be a positive number, not {headroom!r}")
    if spot_max_fraction is not None and not 0.0 <= spot_max_fraction <= 1.0:
        raise PlanError(f"spot_max_fraction must be in [0, 1], not {spot_max_fraction!r}")
    on_demand = np.array([o.tier == "on-demand" for o in options])
    if on_demand_floor and not on_demand.any():
        raise PlanError(f"on_demand_floor is {on_demand_floor} but there is no on-demand option")
    for o in options:
        if not o.capacity.meets_slo or o.capacity.requests_per_s <= 0:
            raise PlanError(f"option {o.label} does not meet the SLO ({o.capacity.why})")

    started = time.perf_counter()
    price = np.array([o.usd_per_hour for o in options])
    rps = np.array([o.capacity.requests_per_s for o in options])
    ops = np.array([o.capacity.output_tokens_per_s for o in options])
    pps = np.array([o.capacity.prompt_tokens_per_s if o.capacity.prompt_tokens_per_s is not None else math.inf
                    for o in options])
    upper = np.array([o.max_count if o.max_count is not None else np.inf for o in options], dtype=np.float64)
    bounds = Bounds(np.zeros(len(options)), upper)
    integrality = np.ones(len(options))
    deadline = started + time_limit_s
    memo: dict[tuple[float, float, float], tuple[dict[int, int], str, str]] = {}

    def one(d: WindowDemand) -> tuple[dict[int, int], str, str]:
        rows, lower = [], []
        for need, cap in ((d.requests_per_s, rps), (d.output_tokens_per_s, ops), (d.prompt_tokens_per_s, pps)):
            if need > 0:  # scaled so that the right-hand side is the headroom; a replica that covers the
                with np.errstate(over="ignore"):  # whole need alone counts as just that (same integer solutions)
                    rows.append(np.minimum(cap / need, headroom))
                lower.append(headroom)
        if on_demand_floor:
            rows.append(on_demand.astype(np.float64))
            lower.append(float(on_demand_floor))
        if not rows:
            return {}, "optimal", ""
        constraints = [LinearConstraint(np.array(rows), np.array(lower), np.inf)]
        if spot_max_fraction is not None and not d.empty:
            f = spot_max_fraction
            constraints.append(LinearConstraint(np.where(on_demand, -f * rps, (1 - f) * rps) / rps.max(),
                                                -np.inf, 0.0))
        left = max(deadline - time.perf_counter(), 0.05)
        res = milp(price, constraints=constraints, integrality=integrality, bounds=bounds,
                   options={"time_limit": left, "mip_rel_gap": 1e-7})
        if res.x is None:
            why = ("no mix of the options meets its demand within max_count, spot_max_fraction and the floor"
                   if res.status == 2 else str(res.message))
            return {}, "infeasible", why
        x = np.rint(res.x).astype(np.int64)
        return {i: int(n) for i, n in enumerate(x) if n > 0}, "optimal" if res.status == 0 else "feasible", ""

    counts, statuses, notes, costs = [], [], [], []
    gpu_hours = 0.0
    for w, d in enumerate(demands):
        key = (d.requests_per_s, d.output_tokens_per_s, d.prompt_tokens_per_s)
        if key not in memo:
            memo[key] = one(d)
        c, status, why = memo[key]
        counts.append(dict(c))
        statuses.append(status)
        if why:
            notes.append(f"window {w} ({d.start_s:g}-{d.end_s:g} s, {d.requests_per_s:.3g} req/s peak): {why}")
        costs.append(sum(n * options[i].usd_per_hour for i, n in c.items()) * d.hours)
        gpu_hours += sum(n * options[i].gpus_per_replica for i, n in c.items()) * d.hours
    overall = ("infeasible" if "infeasible" in statuses else "feasible" if "feasible" in statuses
               else "optimal")
    return Plan(counts=tuple(counts), window_cost_usd=tuple(costs), window_status=tuple(statuses),
                cost_usd=float(sum(costs)), gpu_hours=float(gpu_hours), status=overall,
                solve_s=time.perf_counter() - started, notes=tuple(notes))


def single_option_cost(demands: Sequence[WindowDemand], option: Option, *, on_demand_floor: int = 0,
                       headroom: float = 1.0) -> float:
    """What serving every window with ``option`` alone costs ($; inf if it cannot: a floor on a spot option,
    or its ``max_count``): an upper bound on :func:`solve`'s optimum, checked in the tests."""
    c = option.capacity
    total = 0.0
    for d in demands:
        n = 0
        for need, cap in ((d.requests_per_s, c.requests_per_s), (d.output_tokens_per_s, c.output_tokens_per_s),
                          (d.prompt_tokens_per_s, c.prompt_tokens_per_s)):
            if need > 0 and cap is not None:
                n = max(n, 1, math.ceil(need * headroom / cap - 1e-9))
        if on_demand_floor:
            if option.tier != "on-demand":
                return math.inf
            n = max(n, on_demand_floor)
        if option.max_count is not None and n > option.max_count:
            return math.inf
        total += n * option.usd_per_hour * d.hours
    return total


# -- 4. the fleet spec -------------------------------------------------------------------------------------


#: The scaling knobs of a planned spec (its pools' tokens_per_s are capacities at the SLO).
PLANNED_SCALING = {"target_utilisation": 0.85, "scale_down_utilisation": 0.6}


def plan_to_fleet_spec(plan: Plan, options: Sequence[Option], demands: Sequence[WindowDemand], *, model: str,
                       slo: Slo, engine: str, start_epoch: float | None, on_demand_floor: int,
                       max_headroom: float = 1.0, schedules: bool = True, lead_s: float = 0.0) -> dict[str, Any]:
    """A fleet spec mapping (``{"models": {model: ...}}``) that :func:`~skyfleet.fleet.spec.parse_fleet_spec`
    accepts, for the plan.

    * One pool per option the plan uses, named from its instance type and tier (``g6e-xlarge-spot``,
      ``g6e-xlarge-od``; the region is added when a type is used in two regions): ``max`` = the option's peak
      count over the windows times ``max_headroom`` (rounded up), ``min`` = its fewest (what every window
      needs) without schedules, 0 with schedules (they carry the plan; at other times of day the live
      policy decides), raised on the on-demand pools (largest first) until their minimums make up
      ``on_demand_floor``; ``tokens_per_s`` = the replica's output tokens/s at the SLO (what the live
      policy sizes with).
      A plan with no replica at all (no demand, no floor) gets the cheapest option per token, 0 to 1.
    * ``on_demand_floor``, ``slo`` and ``engine`` as given; ``scaling`` = :data:`PLANNED_SCALING` (target
      utilisation 0.85, scale-down below 0.6: the pools' ``tokens_per_s`` are capacities at the SLO already).
    * ``schedules`` (when asked, the trace's ``start_epoch`` is known, the plan has more than one window and
      its total varies, the windows are at least a minute long and span at most a day): one daily schedule
      per window, cron ``M H * * *`` in UTC at the window's start rounded down to the minute, lasting until
      the window's end: ``min`` = the planned total (pre-provisioned), ``max`` = the planned total times
      ``max_headroom`` (at least 1, so a request can always wake the model, at most the pools' sum). A window
      that needs more replicas than the one before starts ``lead_s`` earlier (give it the replicas' cold
      start, so that they are READY when the window begins), but never before the previous window's
      schedule (each fires at least a minute after the one before; the last to fire wins). Outside the
      windows the pools' bounds apply.
    """
    if not plan.ok:
        raise PlanError("the plan is infeasible: " + "; ".join(plan.notes))
    if max_headroom < 1.0:
        raise PlanError(f"max_headroom must be >= 1, not {max_headroom!r}")
    if not (lead_s >= 0 and math.isfinite(lead_s)):
        raise PlanError(f"lead_s must be a finite number >= 0, not {lead_s!r}")
    used = plan.used()
    if not used:
        used = [min(range(len(options)), key=lambda i: options[i].usd_per_million_tokens)]
    per_type_regions: dict[tuple[str, str], set[str]] = {}
    for i in used:
        per_type_regions.setdefault((options[i].instance_type, options[i].tier), set()).add(options[i].region)
    names: set[str] = set()
    pools = []
    for i in used:
        o = options[i]
        tier = "spot" if o.tier == "spot" else "od"
        base = [o.instance_type] + ([o.region] if len(per_type_regions[(o.instance_type, o.tier)]) > 1 else [])
        name = _unique(_dns_label("-".join([*base, tier]), suffix_room=3), names)
        peak = max(plan.peak(i), 1)
        pools.append({
            "name": name, "instance_type": o.instance_type, "region": o.region, "tier": o.tier,
            "min": plan.least(i), "max": math.ceil(peak * max_headroom - 1e-9),
            "tokens_per_s": round(o.capacity.output_tokens_per_s, 1),
        })
    spec: dict[str, Any] = {
        "engine": engine,
        "slo": {"ttft_p95_s": slo.ttft_p95_s, "tpot_p95_s": slo.tpot_p95_s},
        "on_demand_floor": on_demand_floor,
        "pools": pools,
        # tokens_per_s is already each replica's capacity *at the SLO*: the live policy needs less margin on
        # top of it than with a learned capacity (bench/results/planner_azure.md: 0.7 over-provisions by ~15%)
        "scaling": dict(PLANNED_SCALING),
    }
    found = (_schedules(plan, demands, start_epoch, max_headroom, sum(p["max"] for p in pools), lead_s)
             if schedules else [])
    if found:
        spec["schedules"] = found
        for p in pools:  # the schedules carry the plan; at other times of day the live policy decides
            p["min"] = 0
    floor_left = on_demand_floor - sum(p["min"] for p in pools if p["tier"] == "on-demand")
    for p in sorted((p for p in pools if p["tier"] == "on-demand"), key=lambda p: -p["max"]):
        add = max(min(floor_left, p["max"] - p["min"]), 0)  # the floor holds at every hour
        p["min"] += add
        floor_left -= add
    return {"models": {model: spec}}


def _schedules(plan: Plan, demands: Sequence[WindowDemand], start_epoch: float | None, max_headroom: float,
               pools_max: int, lead_s: float) -> list[dict[str, Any]]:
    if start_epoch is None or len(demands) < 2:
        return []
    totals = [plan.replicas(w) for w in range(len(demands))]
    if len(set(totals)) < 2 or any(d.end_s - d.start_s < 60.0 for d in demands):
        return []
    out: list[dict[str, Any]] = []
    previous_fire = -math.inf
    for w, (d, total) in enumerate(zip(demands, totals, strict=True)):
        at = start_epoch + d.start_s
        lead = lead_s if w == 0 or total > totals[w - 1] else 0.0  # only a scale-up needs the head start
        fire = max(math.floor((at - lead) / 60.0) * 60.0, previous_fire + 60.0)
        previous_fire = fire
        when = datetime.fromtimestamp(fire, UTC)
        out.append({
            "cron": f"{when.minute} {when.hour} * * *", "timezone": "UTC",
            "min": total, "max": min(pools_max, max(math.ceil(total * max_headroom - 1e-9), 1)),
            "duration_s": round(start_epoch + d.end_s - fire, 3),
        })
    if out[0]["duration_s"] + (demands[-1].end_s - demands[0].end_s) > DAY_S:
        return []  # more than a day from the first start: daily schedules would collide
    return out


def _dns_label(text: str, *, suffix_room: int = 0) -> str:
    label = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    return label[: 40 - suffix_room].strip("-") or "pool"


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    taken.add(out)
    return out
