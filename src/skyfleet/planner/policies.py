"""The scaling policies ``skyfleet simulate`` compares, and :func:`compare` to run them on one trace.

All four are fleet :class:`~skyfleet.fleet.policy.base.Policy` objects (the controller's ``decide``
signature), so the simulator drives each exactly as the live controller drives its policy:

* ``static-peak``: on-demand only, a fixed fleet for the trace's busiest minute. The count is the cheapest
  on-demand mix (the spec's on-demand pools, within their ``max``) whose capacity at the SLO
  (:func:`~skyfleet.planner.capacity.replica_capacity`) covers the peak minute's requests, output tokens and
  prompt tokens per second (:func:`~skyfleet.planner.milp.demand_windows` with one window, the planner's
  :func:`~skyfleet.planner.milp.solve`); never changes.
* ``reactive``: a Kubernetes HPA on the engines' concurrency. Every decision: ``load`` = mean running +
  waiting requests over the last 15 s (all replicas, plus the gateway's queue), ``utilisation = load /
  (current replicas x per-replica capacity)`` where the capacity is the replica's largest batch at the SLO
  (``ReplicaCapacity.max_batch``), ``desired = ceil(current x utilisation / target)`` with the fleet spec's
  ``scaling.target_utilisation`` (replicas not ready yet count as idle, as HPA does), left unchanged within
  HPA's 10% tolerance; up at most ``max(2 x current, current + 4)`` per decision (HPA's default scale-up
  policies), down only to the highest recommendation of the last 300 s (HPA's default down-scale
  stabilisation); bounds from the spec. Replicas are placed like the default policy places them
  (:func:`~skyfleet.fleet.policy.default.allocate`: the on-demand floor, then spot first), so only the
  sizing differs from ``skyfleet``.
* ``skyfleet``: the controller's ``default`` policy, unchanged (:func:`skyfleet.fleet.policy.load_policy`).
* ``oracle``: a clairvoyant reference. Per minute of the trace, the cheapest replica counts over the spec's
  pools whose capacity covers that minute's requests, output and prompt tokens per second times a headroom
  searched per minute by simulation (:func:`refine_oracle`, :func:`~skyfleet.planner.milp.solve`), with the on-demand floor, pool maxima and, for spot pools with a
  spot trace, no spot replica in a minute when that pool's capacity is gone at any time in it. It has no cold
  start (the simulator starts its replicas READY) and knows the future; it is not a policy one can run.

Capacities are computed with ``prefill_interference=0``: the simulated replica's own timing model (prefill
does not slow decoding in :class:`~skyfleet.engines.sim.model.SimModel`), at the trace's mean request sizes.
Neither ``static-peak`` nor ``reactive`` is in the fleet policy table: both need the trace or the engine
profiles to size anything, which a fleet spec does not carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from skyfleet.cost.catalog import Catalog
from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import MAX_HISTORY, Decision, Policy, PolicyState
from skyfleet.fleet.policy.default import allocate, rank_pools
from skyfleet.planner.capacity import ReplicaCapacity, replica_capacity
from skyfleet.planner.milp import Option, PlanError, demand_windows, solve
from skyfleet.planner.spot import SpotTrace
from skyfleet.planner.types import EngineProfile, Trace

if TYPE_CHECKING:
    from skyfleet.fleet.policy.signals import WindowSnapshot
    from skyfleet.fleet.spec import ModelFleet
    from skyfleet.planner.results import SimResult

__all__ = ["POLICIES", "OraclePolicy", "PolicyError", "ReactivePolicy", "StaticPolicy", "build_policy", "compare",
           "oracle_plan", "pool_capacities", "refine_oracle", "static_peak_counts", "warm_fleet"]

POLICIES = ("static-peak", "reactive", "skyfleet", "oracle")
#: the oracle's interval: one minute of the trace
ORACLE_WINDOW_S = 60.0
#: the headroom ladder the oracle's search climbs, per window (capacity over the capacity model's demand)
ORACLE_HEADROOMS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0)


class PolicyError(ValueError):
    """A policy that cannot be built for this fleet (e.g. no on-demand pool for static-peak)."""


def pool_capacities(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], *,
                    prefill_interference: float = 0.0) -> dict[str, ReplicaCapacity]:
    """Each pool's replica capacity at the fleet's SLO for the trace's mean request (see the module)."""
    prompt = float(np.mean(trace.prompt_tokens)) if len(trace) else 0.0
    output = float(np.mean(trace.output_tokens)) if len(trace) else 1.0
    out = {}
    for p in fleet.pools:
        prof = profiles.get(p.name)
        if prof is None:
            raise PolicyError(f"no engine profile for pool {p.name!r}")
        out[p.name] = replica_capacity(prof, fleet.slo, mean_prompt_tokens=prompt, mean_output_tokens=output,
                                       prefill_interference=prefill_interference)
    return out


def _options(fleet: ModelFleet, profiles: Mapping[str, EngineProfile], caps: Mapping[str, ReplicaCapacity],
             catalog: Catalog, *, tiers: Sequence[str] = ("spot", "on-demand"),
             unavailable: frozenset[str] = frozenset()) -> list[tuple[str, Option]]:
    out = []
    for p in fleet.pools:
        c = caps[p.name]
        if p.tier not in tiers or not c.meets_slo:
            continue
        it = catalog.get(p.instance_type, p.region)
        usd = it.spot_usd_per_hr if p.tier == "spot" and it.spot_usd_per_hr is not None else it.ondemand_usd_per_hr
        out.append((p.name, Option(p.instance_type, p.region, p.tier, usd, profiles[p.name], c,
                                   max_count=0 if p.name in unavailable else p.max, gpus=it.accelerator_count)))
    return out


def static_peak_counts(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile],
                       catalog: Catalog, *, peak_s: float = 60.0) -> dict[str, int]:
    """Replicas per pool for the trace's peak ``peak_s`` seconds, on-demand pools only (see the module)."""
    caps = pool_capacities(trace, fleet, profiles)
    opts = _options(fleet, profiles, caps, catalog, tiers=("on-demand",))
    if not opts:
        raise PolicyError("static-peak needs an on-demand pool that meets the SLO")
    demand = demand_windows(trace, max(trace.duration_s, peak_s) + 1.0, peak_s=peak_s)
    peak = max(demand, key=lambda d: d.requests_per_s)
    plan = solve([peak], [o for _, o in opts], on_demand_floor=max(fleet.on_demand_floor, 1))
    if not plan.ok:
        raise PolicyError("static-peak: the on-demand pools cannot serve the peak: " + "; ".join(plan.notes))
    counts = {p.name: 0 for p in fleet.pools}
    for i, n in plan.counts[0].items():
        counts[opts[i][0]] = n
    return counts


@dataclass(frozen=True, slots=True)
class StaticPolicy:
    """The same replicas per pool at every decision."""

    counts: Mapping[str, int]
    name: str = "static-peak"

    def decide(self, spec: ModelFleet, window: WindowSnapshot, catalog: Catalog, now: float,
               state: PolicyState) -> tuple[Decision, PolicyState]:
        desired = {p.name: int(self.counts.get(p.name, 0)) for p in spec.pools}
        before = sum(state.desired.values()) if state.desired is not None else None
        total = sum(desired.values())
        direction = 0 if before is None else (total > before) - (total < before)
        return (Decision(desired=desired, reason=f"static: {total} replicas", direction=direction,
                         inputs={"now": now, "target": total}),
                PolicyState(desired=desired))


@dataclass(frozen=True, slots=True)
class ReactivePolicy:
    """HPA-style scaling on running + waiting requests per replica (see the module docstring)."""

    capacity: Mapping[str, float]  # concurrent requests per replica, by pool
    metric_window_s: float = 15.0
    down_stabilisation_s: float = 300.0
    tolerance: float = 0.1
    name: str = "reactive"

    def decide(self, spec: ModelFleet, window: WindowSnapshot, catalog: Catalog, now: float,
               state: PolicyState) -> tuple[Decision, PolicyState]:
        agg = window.aggregate(now, self.metric_window_s)
        ranked = rank_pools(spec, catalog, agg)
        if state.desired is not None:
            current = {r.name: state.desired.get(r.name, 0) for r in ranked}
        else:
            current = {r.name: min(agg.pool_count(r.name), r.max) for r in ranked}
        n = sum(current.values())
        weights = [(current[r.name], self.capacity.get(r.name, 1.0)) for r in ranked]
        if n:
            per_replica = sum(c * k for c, k in weights) / n
        else:  # the pool the first replica would go to
            first = allocate(ranked, 1, spec.on_demand_floor, {}, enforce_pool_min=False)
            per_replica = next((self.capacity.get(k, 1.0) for k, v in first.items() if v), 1.0)
        load = agg.running_mean + agg.waiting_mean + agg.queue_mean
        target = spec.scaling.target_utilisation
        utilisation = load / (n * per_replica) if n and per_replica else None
        if utilisation is None:
            want = math.ceil(load / (per_replica * target) - 1e-9) if per_replica else 0
        elif abs(utilisation / target - 1.0) <= self.tolerance:
            want = n
        else:
            want = math.ceil(n * utilisation / target - 1e-9)
        want = min(want, max(2 * n, n + 4))
        history = (*(e for e in state.history if e[0] > now - self.down_stabilisation_s), (now, want))
        if want < n:
            want = min(n, max(w for _, w in history))
        lo, hi = spec.bounds(now)
        total = min(max(want, lo, 1), hi)
        desired = allocate(ranked, total, spec.on_demand_floor, current, enforce_pool_min=True)
        total = sum(desired.values())
        direction = (total > n) - (total < n)
        drain: list[str] = []
        for pool, k in desired.items():
            seen = sorted((r for r in agg.replicas if r.pool == pool),
                          key=lambda r: (r.running_latest + r.waiting_latest, r.replica_id))
            drain.extend(r.replica_id for r in seen[:max(0, len(seen) - k)])
        reason = f"{n} -> {total}: load {load:.1f} requests, utilisation " + (
            f"{utilisation:.2f}" if utilisation is not None else "n/a") + f" (target {target:g})"
        return (Decision(desired=desired, drain=tuple(sorted(drain)), reason=reason, direction=direction,
                         inputs={"now": now, "current": n, "target": total, "load": load,
                                 "utilisation": utilisation}),
                PolicyState(desired=desired, history=history[-MAX_HISTORY:],
                            last_change_at=now if direction else state.last_change_at,
                            last_direction=direction or state.last_direction))


def oracle_plan(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], catalog: Catalog, *,
                spot: Mapping[str, SpotTrace] | None = None, window_s: float = ORACLE_WINDOW_S,
                headroom: float | Sequence[float] = 1.0, exclude: frozenset[str] = frozenset()) \
        -> list[dict[str, int]]:
    """Replicas per pool for each ``window_s`` of the trace (index = floor(t / window_s)); see the module.

    ``headroom``: capacity over demand, one factor for all windows or one per window. ``exclude``: pools
    not to use at all."""
    caps = pool_capacities(trace, fleet, profiles)
    demands = demand_windows(trace, window_s, peak_s=window_s)
    spot = spot or {}

    def gone(pool: str, start: float, end: float) -> bool:
        tr = spot.get(pool)
        return tr is not None and (not tr.available(start) or tr.next_change(start) < end)

    heads = [float(headroom)] * len(demands) if isinstance(headroom, int | float) else list(headroom)
    if len(heads) < len(demands):
        raise PolicyError(f"oracle: {len(heads)} headroom factors for {len(demands)} windows")
    groups: dict[tuple[frozenset[str], float], list[int]] = {}
    for w, d in enumerate(demands):
        key = exclude | frozenset(p.name for p in fleet.pools
                                  if p.tier == "spot" and gone(p.name, d.start_s, d.end_s))
        groups.setdefault((key, heads[w]), []).append(w)
    floor = max(fleet.on_demand_floor, 1 if fleet.min_replicas else 0)
    out: list[dict[str, int]] = [{} for _ in demands]
    for (unavailable, head), windows in groups.items():
        opts = _options(fleet, profiles, caps, catalog, unavailable=unavailable)
        if not opts:
            raise PolicyError("oracle: no pool meets the SLO")
        plan = solve([demands[w] for w in windows], [o for _, o in opts], on_demand_floor=floor, headroom=head)
        if not plan.ok:  # past the pools' maxima: the most the pools hold
            plan = solve([demands[w] for w in windows], [o for _, o in opts], on_demand_floor=floor,
                         headroom=1.0)
        for k, w in enumerate(windows):
            counts = {p.name: 0 for p in fleet.pools}
            for i, n in plan.counts[k].items():
                counts[opts[i][0]] = n
            if not any(counts.values()):  # nothing to serve and no floor: still one replica awake
                cheapest = min(opts, key=lambda o: o[1].usd_per_hour)
                counts[cheapest[0]] = 1
            out[w] = counts
    return out


@dataclass(frozen=True, slots=True)
class OraclePolicy:
    """Replays an :func:`oracle_plan`: at ``now``, the counts of the window containing it."""

    plan: Sequence[Mapping[str, int]]
    epoch: float  # wall-clock time of the trace's start
    window_s: float = ORACLE_WINDOW_S
    headroom: float = 1.0  # what the plan was solved with (reported)
    name: str = "oracle"
    clairvoyant: bool = True  # the simulator starts its replicas with no cold start

    def decide(self, spec: ModelFleet, window: WindowSnapshot, catalog: Catalog, now: float,
               state: PolicyState) -> tuple[Decision, PolicyState]:
        w = min(max(int((now - self.epoch) // self.window_s), 0), len(self.plan) - 1)
        desired = {p.name: int(self.plan[w].get(p.name, 0)) for p in spec.pools}
        before = sum(state.desired.values()) if state.desired is not None else 0
        total = sum(desired.values())
        return (Decision(desired=desired, reason=f"oracle window {w}: {total} replicas",
                         direction=(total > before) - (total < before), inputs={"now": now, "target": total}),
                PolicyState(desired=desired))


def warm_fleet(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], catalog: Catalog, *,
               first_s: float = 300.0, utilisation: float | None = None) -> dict[str, int]:
    """A fleet already serving when the trace starts: the cheapest mix (spot allowed, the on-demand floor)
    for the peak minute of the first ``first_s`` seconds at ``utilisation`` (default: the spec's
    ``scaling.target_utilisation``), i.e. about where a utilisation-targeting policy settles."""
    caps = pool_capacities(trace, fleet, profiles)
    opts = _options(fleet, profiles, caps, catalog)
    head = [d for d in demand_windows(trace, first_s, peak_s=60.0)[:1]]
    u = utilisation if utilisation is not None else fleet.scaling.target_utilisation
    plan = solve(head, [o for _, o in opts], on_demand_floor=max(fleet.on_demand_floor, 1), headroom=1.0 / u)
    counts = {p.name: 0 for p in fleet.pools}
    for i, n in (plan.counts[0].items() if plan.ok and plan.counts else ()):
        counts[opts[i][0]] = n
    return counts


def refine_oracle(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], catalog: Catalog, *,
                  spot: Mapping[str, SpotTrace] | None, epoch: float, goal: float = 0.99,
                  headrooms: Sequence[float] = ORACLE_HEADROOMS, rounds: int = len(ORACLE_HEADROOMS),
                  sim: Mapping[str, Any] | None = None) -> OraclePolicy:
    """The oracle, checked by simulation: the cheapest plan found whose simulated SLO attainment reaches
    ``goal`` (else the best-attaining one).

    The capacity model is a steady-state mean at conservative sizes (every request at the batch where TPOT
    reaches the SLO): in calm minutes a replica serves more than it says, so headroom 1 over-provisions;
    bursts within a minute, long prompts blocking a KV-limited replica and routing that spreads load evenly
    over unequal replicas cost more than it says, so headroom 1 may miss the SLO. The search starts below
    1 and raises the headroom only where it is needed:
    every window starts at ``headrooms[0]``; after each simulation (up to ``rounds``), each window whose
    requests missed ``goal``, and the window before it (its backlog carries over), moves one step up the
    ``headrooms`` ladder. If that never reaches ``goal``, one headroom for all windows, the smallest that
    does, as a fallback.

    The capacity model puts a replica at the edge of the TPOT objective, so a slow type that is cheap per
    token can miss it where a faster one would not: the search is run for the fastest type alone, then the
    two fastest, and so on to all pools (by the profile's ``tpot_base_s``), and the cheapest plan that
    reaches ``goal`` wins.
    """
    from skyfleet.planner.simulator import simulate

    kw = {k: v for k, v in (sim or {}).items() if k not in ("progress", "initial", "name")}
    kw["slo_window_s"] = ORACLE_WINDOW_S
    best: tuple[float, float, OraclePolicy] | None = None  # (attainment, -cost, policy)

    def run(heads: float | Sequence[float], label: float, exclude: frozenset[str]) -> tuple[float, SimResult]:
        nonlocal best
        policy = OraclePolicy(oracle_plan(trace, fleet, profiles, catalog, spot=spot, headroom=heads,
                                          exclude=exclude), epoch=epoch, headroom=label)
        res = simulate(trace, fleet, profiles, policy=policy, catalog=catalog, spot=spot, **kw)
        met = res.slo_met or 0.0
        key = (min(met, goal), -res.cost_usd)
        if best is None or key > best[:2]:
            best = (key[0], key[1], policy)
        return met, res

    n = len(demand_windows(trace, ORACLE_WINDOW_S, peak_s=ORACLE_WINDOW_S))
    speeds = sorted({profiles[p.name].tpot_base_s for p in fleet.pools})
    for fastest in speeds:
        exclude = frozenset(p.name for p in fleet.pools if profiles[p.name].tpot_base_s > fastest)
        try:
            _search(run, n, headrooms, rounds, goal, exclude)
        except (PolicyError, PlanError):  # these pools cannot hold the on-demand floor or serve at all
            continue
    if best is None:
        raise PolicyError("oracle: no set of pools meets the SLO and holds the on-demand floor")
    return best[2]


def _search(run: Callable[[float | Sequence[float], float, frozenset[str]], tuple[float, SimResult]], n: int,
            headrooms: Sequence[float], rounds: int, goal: float, exclude: frozenset[str]) -> None:
    """:func:`refine_oracle`'s per-window headroom search over one set of pools (``run`` keeps the best)."""
    steps = [0] * n
    met = 0.0
    for _ in range(rounds):
        met, res = run([headrooms[k] for k in steps], max(headrooms[k] for k in steps), exclude)
        if met >= goal:
            return
        missed = {j for j, w in enumerate(_by_window(res, n)) if w is not None and w < goal}
        bump = {j for w in missed for j in (w - 1, w) if 0 <= j < n and steps[j] + 1 < len(headrooms)}
        if not bump:
            break
        for j in bump:
            steps[j] += 1
    for h in headrooms[1:]:
        if run(h, h, exclude)[0] >= goal:
            return


def _by_window(res: SimResult, n: int) -> list[float | None]:
    """Attainment (both objectives) of each oracle window's requests; ``None``: no request in it."""
    out: list[float | None] = [None] * n
    for w in res.windows:
        j = int(float(w["start_s"]) // ORACLE_WINDOW_S)
        if 0 <= j < n and w["requests"]:
            out[j] = float(w["both"]) if w["both"] is not None else 1.0
    return out


def build_policy(name: str, trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile],
                 catalog: Catalog, *, spot: Mapping[str, SpotTrace] | None = None, epoch: float,
                 sim: Mapping[str, Any] | None = None) -> Policy:
    """The policy called ``name`` (one of :data:`POLICIES`, or any fleet policy name) for this trace.

    ``sim``: the simulator's keyword arguments, for the oracle's check by simulation (:func:`refine_oracle`).
    """
    if name == "static-peak":
        return StaticPolicy(static_peak_counts(trace, fleet, profiles, catalog))
    if name == "reactive":
        caps = pool_capacities(trace, fleet, profiles)
        return ReactivePolicy({k: float(max(c.max_batch, 1)) for k, c in caps.items()})
    if name == "oracle":
        return refine_oracle(trace, fleet, profiles, catalog, spot=spot, epoch=epoch, sim=sim)
    return load_policy("default" if name == "skyfleet" else name)


def _one(args: tuple[str, Trace, ModelFleet, Mapping[str, EngineProfile], Catalog, Any, dict[str, Any]]) \
        -> SimResult:
    from skyfleet.planner.simulator import DEFAULT_EPOCH, simulate

    name, trace, fleet, profiles, catalog, spot, kw = args
    spot_map = ({p.name: spot for p in fleet.pools if p.tier == "spot"} if isinstance(spot, SpotTrace)
                else dict(spot or {}))
    epoch = trace.start_epoch if trace.start_epoch is not None else DEFAULT_EPOCH
    policy = build_policy(name, trace, fleet, profiles, catalog, spot=spot_map, epoch=epoch, sim=kw)
    if isinstance(policy, StaticPolicy | OraclePolicy):  # their own fleet from the first instant
        kw = {k: v for k, v in kw.items() if k != "initial"}
    return simulate(trace, fleet, profiles, policy=policy, catalog=catalog, spot=spot_map, name=name, **kw)


def compare(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], *,
            policies: Sequence[str] = POLICIES, catalog: Catalog | None = None,
            spot: SpotTrace | Mapping[str, SpotTrace] | None = None, processes: int = 1, warm: bool = True,
            progress: Callable[[str, float, float], None] | None = None, **kw: Any) -> dict[str, SimResult]:
    """Simulate each policy on the same trace, fleet and spot traces; results by policy name, in order.

    ``initial`` (in ``kw``: replicas per pool READY at 0) applies to the adaptive policies only; static-peak
    and the oracle start with their own fleet. ``warm`` (default) and no ``initial``: the adaptive policies
    start from :func:`warm_fleet` (the fleet was serving before the trace starts), else from their first
    decision (usually the minimum: a cold start into the trace's load).
    ``processes > 1`` runs them in that many worker processes (``progress`` is then not called); ``kw`` goes
    to :func:`~skyfleet.planner.simulator.simulate`.
    """
    catalog = catalog if catalog is not None else Catalog.builtin()
    if warm and kw.get("initial") is None:
        kw["initial"] = warm_fleet(trace, fleet, profiles, catalog)
    jobs = []
    for name in policies:
        extra = dict(kw)
        if progress is not None and processes <= 1:
            extra["progress"] = (lambda n: lambda t, d: progress(n, t, d))(name)
        jobs.append((name, trace, fleet, profiles, catalog, spot, extra))
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(processes, len(jobs))) as pool:
            results = list(pool.map(_one, jobs))
    else:
        results = [_one(j) for j in jobs]
    return dict(zip(policies, results, strict=True))
