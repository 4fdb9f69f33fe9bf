"""The default scaling policy: token throughput and queue against the SLO, stabilised, cheapest pools first.

Each decision, for one model, over the window's last ``scaling.window_s`` seconds:

1. **Recommendation** (a total): requests *wait now* (engine queues or the gateway's admission queue) or
   the TTFT/TPOT p95 over the window is above the SLO -> more: one replica more than now (none while
   replicas are still starting, i.e. the fleet has more desired replicas than report samples), or what the
   throughput needs if that is more. The throughput need is ``ceil(generated tokens/s / (capacity per
   replica x target_utilisation))``, capacity being the pools' ``tokens_per_s`` (the engine profile), else
   the rate a replica reached while requests waited on it. Requests waited at any time in the window -> not
   fewer. Otherwise utilisation below ``scale_down_utilisation`` -> the throughput need; nothing running,
   waiting or generated over the whole window -> none (i.e. the minimum). No sample at all while the
   fleet has replicas (a controller just restarted) -> no change.
2. **Stabilisation** (Kubernetes HPA-style, on the recorded recommendations): up to the *lowest*
   recommendation of the last ``up_stabilisation_s`` when all of them are above the current total, down to
   the *highest* of the last ``down_stabilisation_s`` when all are below (a window only counts once it is
   covered by recommendations). Hence never down while requests wait: those recommendations are >= now.
3. **Cooldown**: a change of direction only ``cooldown_s`` after the last change. **Steps**: at most
   ``max_step_up`` / ``max_step_down`` replicas per decision.
4. **Bounds** win over all of the above: the active schedule's min/max, else the pools' sums; at least one
   replica while awake. **Scale to zero** after ``scale_to_zero_after_s`` idle (subject to the cooldown);
   at zero, a request in the gateway's queue wakes the model at once (the one change exempt from
   stabilisation and cooldown: it is a cold start with a client waiting).
5. **Placement**, changing as little as possible: replicas are added to the cheapest pool by $ per served
   token (catalog $/hour, spot or on-demand, / tokens/s: nominal, else observed, else $/hour alone), the
   first ``on_demand_floor`` of them to on-demand pools, the rest to spot pools first (on-demand pools are
   the fallback when spot pools are full); removed in the reverse order. Pool max > pool min (while no
   schedule is active) > the floor. Drained: the least loaded replicas of pools above their desired count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skyfleet.fleet.policy.base import MAX_HISTORY, Decision, PolicyState

if TYPE_CHECKING:
    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.policy.signals import Aggregate, WindowSnapshot
    from skyfleet.fleet.spec import ModelFleet, PoolSpec

__all__ = ["DefaultPolicy", "allocate", "rank_pools"]


@dataclass(frozen=True, slots=True)
class RankedPool:
    name: str
    tier: str
    min: int
    max: int
    usd_per_hour: float
    tokens_per_s: float | None  # for the ranking: nominal, else observed peak
    capacity_tps: float | None  # for sizing: nominal, else observed while saturated

    @property
    def on_demand(self) -> bool:
        return self.tier == "on-demand"


def rank_pools(spec: ModelFleet, catalog: Catalog, agg: Aggregate | None = None) -> list[RankedPool]:
    """The model's pools, cheapest per served token first (by $/hour alone unless every pool has a rate)."""
    out = []
    for p in spec.pools:
        t = catalog.get(p.instance_type, p.region)
        price = t.spot_usd_per_hr if p.tier == "spot" and t.spot_usd_per_hr is not None else t.ondemand_usd_per_hr
        observed = agg.pool_peak_tps(p.name) if agg is not None else None
        saturated = _saturated_tps(agg, p) if agg is not None else None
        out.append(RankedPool(p.name, p.tier, p.min, p.max, price, p.tokens_per_s or observed,
                              p.tokens_per_s or saturated))
    by_token = all(r.tokens_per_s for r in out)
    return sorted(out, key=lambda r: (r.usd_per_hour / r.tokens_per_s if by_token and r.tokens_per_s
                                      else r.usd_per_hour, r.name))


def _saturated_tps(agg: Aggregate, pool: PoolSpec) -> float | None:
    rates = [r.generation_tps for r in agg.replicas
             if r.pool == pool.name and r.generation_tps and r.waiting_max > 0]
    return max(rates) if rates else None


def allocate(ranked: list[RankedPool], total: int, floor: int, previous: Mapping[str, int],
             *, enforce_pool_min: bool) -> dict[str, int]:
    """Replicas per pool for ``total``, starting from ``previous`` and moving as few replicas as possible."""
    lo = {r.name: (r.min if enforce_pool_min else 0) for r in ranked}
    counts = {r.name: min(max(previous.get(r.name, 0), lo[r.name]), r.max) for r in ranked}
    od_floor = min(floor, total)
    spot = [r for r in ranked if not r.on_demand]
    od = [r for r in ranked if r.on_demand]

    def on_demand() -> int:
        return sum(counts[r.name] for r in od)

    def first(pools: list[RankedPool], ok: Callable[[RankedPool], bool]) -> RankedPool | None:
        return next((r for r in pools if ok(r)), None)

    def removable(r: RankedPool) -> bool:
        return counts[r.name] > lo[r.name]

    while sum(counts.values()) > total:  # remove: the reverse of the order of addition
        pick = (first(od[::-1], removable) if on_demand() > od_floor else None) \
            or first(spot[::-1], removable) or first(od[::-1], removable)
        if pick is None:
            break
        counts[pick.name] -= 1
    while sum(counts.values()) < total:  # add: floor on-demand, then spot, then on-demand fallback
        order = od + spot if on_demand() < od_floor else spot + od
        pick = first(order, lambda r: counts[r.name] < r.max)
        if pick is None:
            break
        counts[pick.name] += 1
    while on_demand() < od_floor:  # the floor, by moving spot replicas (pool minimums permitting)
        src = first(spot[::-1], lambda r: counts[r.name] > lo[r.name])
        dst = first(od, lambda r: counts[r.name] < r.max)
        if src is None or dst is None:
            break
        counts[src.name] -= 1
        counts[dst.name] += 1
    return counts


class DefaultPolicy:
    name = "default"

    def decide(self, spec: ModelFleet, window: WindowSnapshot, catalog: Catalog, now: float,
               state: PolicyState) -> tuple[Decision, PolicyState]:
        sc = spec.scaling
        agg = window.aggregate(now, sc.window_s)
        ranked = rank_pools(spec, catalog, agg)
        pool_names = {r.name for r in ranked}
        if state.desired is not None:
            current = {r.name: state.desired.get(r.name, 0) for r in ranked}
        else:  # first decision: start from what runs
            current = {r.name: min(agg.pool_count(r.name), r.max) for r in ranked}
        n = sum(current.values())
        lo, hi = spec.bounds(now)
        lo_awake = min(max(lo, 1), hi)
        schedule = spec.active_schedule(now)

        slo_breach = _above(agg.ttft_p95_s, spec.slo.ttft_p95_s) or _above(agg.tpot_p95_s, spec.slo.tpot_p95_s)
        # Waiting now (sustained: stabilisation asks it of every recommendation of the up window) asks for
        # more; having waited at all within the signal window forbids fewer.
        pressure = slo_breach or agg.waiting_latest > 0 or agg.queue_latest > 0
        waited = agg.waiting_mean > 0 or agg.queue_mean > 0
        idle = (agg.running_max == 0 and agg.waiting_max == 0 and agg.queue_max == 0
                and agg.generation_tps == 0 and agg.prompt_tps == 0)
        no_data = n > 0 and not agg.replicas  # e.g. just restarted: the window is still empty
        if no_data:
            idle, idle_since = False, state.idle_since
        else:
            idle_since = (state.idle_since if state.idle_since is not None else now) if idle else None
        capacity = _capacity(ranked, current)
        need = (math.ceil(agg.generation_tps / (capacity * sc.target_utilisation) - 1e-9)
                if capacity else None)
        pending = n > len([r for r in agg.replicas if r.pool in pool_names])

        utilisation = agg.generation_tps / (n * capacity) if capacity and n else None
        want = n if no_data else _recommend(n, pressure=pressure, waited=waited, pending=pending, idle=idle,
                                            need=need, utilisation=utilisation,
                                            scale_down_utilisation=sc.scale_down_utilisation)
        history = _history(state.history, now, want, max(sc.up_stabilisation_s, sc.down_stabilisation_s))

        cooling = (state.last_change_at is not None and now - state.last_change_at < sc.cooldown_s)
        direction_now = state.last_direction

        def allowed(direction: int) -> bool:
            return not (cooling and direction_now not in (0, direction))

        exempt = False  # from the bounds' minimum: asleep, or going to sleep
        if n == 0 and agg.queue_latest > 0:
            target, why = lo_awake, f"wake from zero: {agg.queue_latest} request(s) queued"
        elif n == 0 and state.desired is not None and spec.scale_to_zero_after_s is not None:
            target, why, exempt = 0, "asleep (scale to zero): no request waiting", True
        elif (spec.scale_to_zero_after_s is not None and idle_since is not None
              and now - idle_since >= spec.scale_to_zero_after_s and n > 0 and allowed(-1)):
            target, why = 0, f"idle for {now - idle_since:.0f} s: scale to zero"
            exempt = True  # below the minimums on purpose
        else:
            target, why = self._stabilised(spec, history, now, n, allowed)
        if not exempt:
            clamped = min(max(target, lo_awake), hi)
            if clamped != target:
                why = f"{why}; bounds [{lo}, {hi}]{' (schedule ' + schedule.cron + ')' if schedule else ''}"
            target = clamped

        desired = allocate(ranked, target, spec.on_demand_floor, current,
                           enforce_pool_min=schedule is None and target > 0)
        target = sum(desired.values())
        direction = (target > n) - (target < n)
        drain = _drain(agg, desired)
        reason = (f"{n} -> {target}: {why}" if direction else f"hold {n}: {why}") + _signals(agg, spec, capacity)
        inputs: dict[str, float | int | None] = {
            "now": now, "current": n, "want": want, "target": target, "min": lo, "max": hi,
            "replicas_seen": len(agg.replicas), "generation_tps": agg.generation_tps, "prompt_tps": agg.prompt_tps,
            "capacity_tps": capacity, "need": need, "running_mean": agg.running_mean,
            "waiting_mean": agg.waiting_mean, "queue_mean": agg.queue_mean, "queue_latest": agg.queue_latest,
            "kv_usage_mean": agg.kv_usage_mean, "ttft_p95_s": agg.ttft_p95_s, "tpot_p95_s": agg.tpot_p95_s,
            "idle_s": None if idle_since is None else now - idle_since,
        }
        changed = direction != 0 and state.desired is not None
        next_state = PolicyState(
            desired=desired, history=history,
            last_change_at=now if changed else state.last_change_at,
            last_direction=direction if changed else state.last_direction,
            idle_since=idle_since,
        )
        return Decision(desired=desired, drain=drain, reason=reason, direction=direction if changed else 0,
                        inputs=inputs), next_state

    @staticmethod
    def _stabilised(spec: ModelFleet, history: tuple[tuple[float, int], ...], now: float, n: int,
                    allowed: Callable[[int], bool]) -> tuple[int, str]:
        sc = spec.scaling
        up = _stable(history, now, sc.up_stabilisation_s)
        down = _stable(history, now, sc.down_stabilisation_s)
        if up is not None and min(up) > n:
            if not allowed(+1):
                return n, "need more, in cooldown"
            return min(min(up), n + sc.max_step_up), f"need more for {sc.up_stabilisation_s:.0f} s"
        if down is not None and max(down) < n:
            if not allowed(-1):
                return n, "need fewer, in cooldown"
            return max(max(down), n - sc.max_step_down), f"need fewer for {sc.down_stabilisation_s:.0f} s"
        return n, "stable"


def _recommend(n: int, *, pressure: bool, waited: bool, pending: bool, idle: bool, need: int | None,
               utilisation: float | None, scale_down_utilisation: float) -> int:
    """The total this one observation asks for (before stabilisation, cooldown, steps and bounds)."""
    if pressure:
        return max(n if pending else n + 1, need or 0)
    if waited:
        return max(n, need or 0)
    if idle:
        return 0
    if need is not None and need > n:
        return need
    if need is not None and utilisation is not None and utilisation < scale_down_utilisation:
        return need
    return n


def _above(observed: float | None, objective: float) -> bool:
    return observed is not None and observed > objective


def _capacity(ranked: list[RankedPool], current: Mapping[str, int]) -> float | None:
    """Tokens/s one replica can serve: the current mix's mean, else the first pool that would be added."""
    known = [(current.get(r.name, 0), r.capacity_tps) for r in ranked if r.capacity_tps]
    weight = sum(c for c, _ in known)
    if weight:
        return sum(c * cap for c, cap in known) / weight  # type: ignore[operator]
    return next((cap for _, cap in known), None)


def _history(history: tuple[tuple[float, int], ...], now: float, want: int,
             keep_s: float) -> tuple[tuple[float, int], ...]:
    """Append, drop entries older than ``keep_s`` but the newest of those (it proves the window covered)."""
    entries = [e for e in history if e[0] <= now] + [(now, want)]
    cutoff = now - keep_s
    older = [e for e in entries if e[0] < cutoff]
    kept = ([older[-1]] if older else []) + [e for e in entries if e[0] >= cutoff]
    return tuple(kept[-MAX_HISTORY:])


def _stable(history: tuple[tuple[float, int], ...], now: float, period_s: float) -> list[int] | None:
    """Recommendations of the last ``period_s``, if the history covers that whole period, else None."""
    if not history or history[0][0] > now - period_s:
        return None
    return [w for t, w in history if t >= now - period_s]


def _drain(agg: Aggregate, desired: Mapping[str, int]) -> tuple[str, ...]:
    out: list[str] = []
    for pool, want in desired.items():
        seen = sorted((r for r in agg.replicas if r.pool == pool),
                      key=lambda r: (r.running_latest + r.waiting_latest, r.replica_id))
        out.extend(r.replica_id for r in seen[:max(0, len(seen) - want)])
    return tuple(sorted(out))


def _signals(agg: Aggregate, spec: ModelFleet, capacity: float | None) -> str:
    parts = [f"{agg.generation_tps:.0f} tok/s"]
    if capacity:
        parts.append(f"capacity {capacity:.0f} tok/s/replica")
    if agg.ttft_p95_s is not None:
        parts.append(f"TTFT p95 {agg.ttft_p95_s:.3g} s (SLO {spec.slo.ttft_p95_s:g})")
    if agg.tpot_p95_s is not None:
        parts.append(f"TPOT p95 {agg.tpot_p95_s:.3g} s (SLO {spec.slo.tpot_p95_s:g})")
    parts.append(f"waiting {agg.waiting_mean:.1f}, queue {agg.queue_latest}")
    return " [" + ", ".join(parts) + "]"
