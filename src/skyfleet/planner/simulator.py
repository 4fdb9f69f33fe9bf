"""Trace replay: the gateway, the replicas and the fleet policy, in virtual time (``skyfleet simulate``).

:func:`simulate` is a discrete-event simulation (a heap of events, one shared
:class:`~skyfleet.clock.ManualClock`) of what a fleet does with a request trace:

* **Arrivals** come from the :class:`~skyfleet.planner.types.Trace`. The gateway routes each with the live
  gateway's routing policy (:func:`skyfleet.routing.make_policy`, ``affinity`` by default) over a
  :class:`~skyfleet.routing.RoutingSnapshot` of the READY replicas (outstanding = requests in flight to it,
  engine waiting from its last scrape). The session key is the trace's ``session``, else a prefix key of its
  Mooncake ``hash_ids`` (:func:`skyfleet.routing.prefix_key`, skipping the leading blocks that most
  requests share, i.e. a global system prompt), else none (least-outstanding).
* **Replicas** are :class:`~skyfleet.engines.sim.model.SimModel` s built from the pool's
  :class:`~skyfleet.planner.types.EngineProfile` (exact continuous batching: KV-capacity admission,
  prefill, batched decode, prefix cache keyed by the trace's block hashes; no per-token events).
* With no READY replica a request waits in the gateway's **admission queue**; after ``queue_timeout_s``
  (60 s) it is dropped (a 503).
* Every ``scrape_interval_s`` each READY replica's counters become a
  :class:`~skyfleet.fleet.policy.signals.ReplicaSample` (through an
  :class:`~skyfleet.engines.metrics.EngineMetrics` built from the replica's
  :class:`~skyfleet.engines.sim.metrics.SimMetrics`, as a scrape of the sim engine's ``/metrics`` gives) and
  the admission queue a :class:`~skyfleet.fleet.policy.signals.QueueSample` in a
  :class:`~skyfleet.fleet.policy.signals.SignalWindow`.
* Every ``controller_interval_s`` the policy decides exactly as ``FleetController.tick`` calls it:
  ``policy.decide(fleet, window.snapshot(wall), catalog, wall, state)`` with ``wall`` = the trace's start
  epoch (else 1,700,000,000) + virtual time and the returned state threaded into the next call. The
  decision is applied like the controller's actuator and an idempotent provider: the named replicas drain,
  then each pool is set to its desired size (surplus: never-ready replicas first, then the newest; missing
  replicas are started and become READY after the profile's ``cold_start_s``). Draining replicas leave
  routing (and the window) at once and stop when their in-flight requests are done.
* **Spot**: a spot pool with a :class:`~skyfleet.planner.spot.SpotTrace` loses all its replicas when the
  trace says capacity is gone: a 2-minute notice takes them out of routing; requests not finished by the
  deadline are cancelled and routed again (counted as ``retried``; their TTFT runs from the original
  arrival). While capacity is gone the pool's starts fail (``start_failures``) and the policy sees the pool
  capped at what it has (``fleet/policy/view.py``), exactly as the live controller shows it a pool whose
  provider refused for lack of capacity: the policy places the rest in the other pools (spot elsewhere, else
  the on-demand fallback).
* **Start**: the first decision (at virtual time 0) is applied warm (its replicas are READY at 0: the
  fleet was serving before the trace starts), unless ``initial`` gives the warm fleet. A clairvoyant policy
  (``policy.clairvoyant = True``, the oracle) has no cold start at all.
* **End**: when every request is answered or dropped; every replica still up is billed to then.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from skyfleet.clock import ManualClock
from skyfleet.cost.catalog import Catalog
from skyfleet.engines.metrics import EngineMetrics, Histogram
from skyfleet.engines.sim.metrics import Histogram as BucketCounter
from skyfleet.engines.sim.metrics import SimMetrics
from skyfleet.engines.sim.model import ContextLengthError, SimModel, SimRequest
from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import Decision, Policy, PolicyState
from skyfleet.fleet.policy.signals import QueueSample, ReplicaSample, SignalWindow
from skyfleet.fleet.policy.view import constrained
from skyfleet.fleet.spec import ModelFleet
from skyfleet.planner.results import (
    BillingRecord,
    SimResult,
    attainment,
    latency_summary,
    window_attainment,
)
from skyfleet.planner.spot import SpotTrace
from skyfleet.planner.types import EngineProfile, Trace
from skyfleet.routing import RouteRequest, RoutingSnapshot, make_policy, prefix_key
from skyfleet.routing.policy import ReplicaLoad

__all__ = ["DEFAULT_EPOCH", "PREEMPTION_NOTICE_S", "SimulationError", "simulate"]

#: wall-clock epoch of virtual time 0 when the trace has none
DEFAULT_EPOCH = 1_700_000_000.0
#: AWS gives two minutes between a spot interruption notice and the reclaim
PREEMPTION_NOTICE_S = 120.0
#: stop simulating this long after the last arrival even if work is left (a fleet that never serves)
_TAIL_LIMIT_S = 6 * 3600.0

# event kinds, in the order they happen at one instant
_READY, _SPOT, _DEADLINE, _ARRIVAL, _TIMEOUT, _DRAIN, _SCRAPE, _TICK = range(8)
_STARTING, _UP, _DRAINING, _RECLAIMED, _STOPPED = range(5)


class SimulationError(ValueError):
    """Inputs the simulator cannot run (a pool without a profile, an empty trace, ...)."""


@dataclass(eq=False, slots=True)
class _Replica:
    id: str
    pool: str
    tier: str
    usd_per_hour: float
    gpus: int
    model: SimModel
    metrics: SimMetrics
    start_s: float
    state: int = _STARTING
    ready_s: float | None = None
    stop_s: float | None = None
    last_waiting: float = 0.0
    last_running: float = 0.0
    #: the last scrape's histograms (counts key, ttft, itl, e2e), reused while nothing changed
    hists: tuple[tuple[int, int, int], Histogram, Histogram, Histogram] | None = None
    #: (request, trace index) submitted to it; finished ones are filtered when needed
    inflight: list[tuple[SimRequest, int]] = field(default_factory=list)


def _hist(h: BucketCounter) -> Histogram:
    """An engines.metrics Histogram (cumulative, as scraped) from a sim engine's bucket counter."""
    cum, total = [], 0.0
    for c in h.counts:
        total += c
        cum.append(total)
    return Histogram(tuple(zip((*h.bounds, math.inf), cum, strict=True)), float(h.sum), float(h.count))


def _shared_blocks(hash_ids: tuple[tuple[int, ...], ...]) -> int:
    """Leading block positions whose id is the same for more than half of the requests (a global prefix)."""
    skip = 0
    while True:
        firsts = Counter(h[skip] for h in hash_ids if len(h) > skip)
        if not firsts:
            return skip
        _, count = firsts.most_common(1)[0]
        if count * 2 <= len(hash_ids):
            return skip
        skip += 1


class _Sim:
    def __init__(self, trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], policy: Policy,
                 catalog: Catalog, spot: Mapping[str, SpotTrace], *, routing: str, load_factor: float,
                 scrape_interval_s: float, controller_interval_s: float, queue_timeout_s: float,
                 initial: Mapping[str, int] | None, model_name: str, slo_window_s: float,
                 progress: Callable[[float, float], None] | None) -> None:
        self.trace, self.fleet, self.policy, self.catalog, self.spot = trace, fleet, policy, catalog, spot
        self.scrape_s, self.tick_s, self.queue_timeout_s = scrape_interval_s, controller_interval_s, queue_timeout_s
        self.initial, self.model_name, self.slo_window_s, self.progress = initial, model_name, slo_window_s, progress
        self.clairvoyant = bool(getattr(policy, "clairvoyant", False))
        self.epoch = trace.start_epoch if trace.start_epoch is not None else DEFAULT_EPOCH
        self.clock = ManualClock(0.0, wall_offset=self.epoch)
        self.router = make_policy(routing, load_factor)
        self.window = SignalWindow(horizon_s=900.0, max_samples=512)
        self.state = PolicyState()
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.route_seq = 0
        self.pools = {p.name: p for p in fleet.pools}
        self.sim_profiles = {}
        self.cold_start = {}
        self.weight: dict[str, int] = {}  # routing capacity of a replica: its parallel sequences at the SLO
        self.price: dict[str, tuple[float, int]] = {}
        for p in fleet.pools:
            prof = profiles.get(p.name)
            if prof is None:
                raise SimulationError(f"no engine profile for pool {p.name!r}")
            sp = prof.sim_profile()
            if trace.hash_ids is not None and trace.block_tokens:
                sp = replace(sp, block_tokens=trace.block_tokens,
                             prefix_cache_blocks=max(1, sp.kv_capacity_tokens // trace.block_tokens))
            self.sim_profiles[p.name] = sp
            self.weight[p.name] = _routing_weight(prof, fleet, trace)
            self.cold_start[p.name] = 0.0 if self.clairvoyant else prof.cold_start_s
            it = catalog.get(p.instance_type, p.region)
            usd = it.spot_usd_per_hr if p.tier == "spot" and it.spot_usd_per_hr is not None else it.ondemand_usd_per_hr
            self.price[p.name] = (usd, it.accelerator_count)
        self.replicas: dict[str, _Replica] = {}
        self.by_pool: dict[str, list[_Replica]] = {p.name: [] for p in fleet.pools}
        self.ready: dict[str, _Replica] = {}
        self.next_id = 0
        self.queue: deque[int] = deque()
        self.queued_at: dict[int, float] = {}
        n = len(trace)
        self.arrival = trace.arrival_s.tolist()
        self.prompt = trace.prompt_tokens.tolist()
        self.output = trace.output_tokens.tolist()
        self.blocks: list[tuple[int, ...]] | tuple[tuple[int, ...], ...] = trace.hash_ids or [()] * n
        self.tenant = [t or "default" for t in trace.tenant] if trace.tenant else ["default"] * n
        self.keys = self._session_keys()
        self.attempt: list[SimRequest | None] = [None] * n
        self.dropped = np.zeros(n, dtype=bool)
        self.rejected = np.zeros(n, dtype=bool)
        self.delayed = np.zeros(n, dtype=bool)
        self.retried = 0
        self.preemptions = 0
        self.start_failures = 0
        self.decisions = 0
        self.billing: list[BillingRecord] = []
        self.series: dict[str, list] = {"t_s": [], "queue": [], "cost_usd": [], "ready": [], "replicas": []}
        self.by_pool_series: dict[str, list[int]] = {p.name: [] for p in fleet.pools}
        self.by_tier_series: dict[str, list[int]] = {"on-demand": [], "spot": []}
        self.end: float | None = None

    # -- setup --

    def _session_keys(self) -> list[str | None]:
        t = self.trace
        if t.session is not None:
            return [s or None for s in t.session]
        if t.hash_ids is not None:
            skip = _shared_blocks(t.hash_ids)
            return [prefix_key(h, 1, skip) for h in t.hash_ids]
        return [None] * len(t)

    def push(self, t: float, kind: int, payload: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, payload))

    # -- replicas --

    def start(self, pool: str, t: float, *, warm: bool = False) -> None:
        usd, gpus = self.price[pool]
        self.next_id += 1
        rid = f"{pool}-{self.next_id}"
        metrics = SimMetrics(self.model_name)
        r = _Replica(rid, pool, self.pools[pool].tier, usd, gpus, SimModel(self.sim_profiles[pool], self.clock, metrics),
                     metrics, start_s=t)
        self.replicas[rid] = r
        self.by_pool[pool].append(r)
        if warm or self.cold_start[pool] <= 0:
            self.on_ready(r, t)
        else:
            self.push(t + self.cold_start[pool], _READY, r)

    def on_ready(self, r: _Replica, t: float) -> None:
        if r.state != _STARTING:
            return
        r.state, r.ready_s = _UP, t
        self.ready[r.id] = r
        while self.queue and self.ready:
            i = self.queue.popleft()
            self.queued_at.pop(i, None)
            self.delayed[i] = True
            self.route(i, t)

    def stop(self, r: _Replica, t: float) -> None:
        if r.state == _STOPPED:
            return
        self.ready.pop(r.id, None)
        r.state, r.stop_s = _STOPPED, t
        self.by_pool[r.pool].remove(r)
        self.window.forget(r.id)
        self.billing.append(BillingRecord(r.id, r.pool, r.tier, r.usd_per_hour, r.gpus, r.start_s, t, r.ready_s))

    def drain(self, r: _Replica, t: float) -> None:
        if r.state == _STARTING:
            self.stop(r, t)
        elif r.state == _UP:
            r.state = _DRAINING
            self.ready.pop(r.id, None)
            self.window.forget(r.id)
            self.check_drained(r, t)

    def check_drained(self, r: _Replica, t: float) -> None:
        if r.state not in (_DRAINING, _RECLAIMED):
            return
        nxt = r.model.next_event_at()
        if r.model.in_flight == 0:
            self.stop(r, t)
        elif nxt < math.inf:
            self.push(max(nxt, t), _DRAIN, r)

    def preempt(self, r: _Replica, t: float) -> None:
        self.preemptions += 1
        if r.state == _STARTING:
            self.stop(r, t)
            return
        r.state = _RECLAIMED
        self.ready.pop(r.id, None)
        self.window.forget(r.id)
        self.push(t + PREEMPTION_NOTICE_S, _DEADLINE, r)
        self.check_drained(r, t)

    def reclaim(self, r: _Replica, t: float) -> None:
        if r.state == _STOPPED:
            return
        moved = [(req, i) for req, i in r.inflight if not req.done]
        for req, _ in moved:
            r.model.cancel(req)
        self.stop(r, t)
        for _, i in moved:
            self.retried += 1
            self.route(i, t)

    def live(self, pool: str) -> list[_Replica]:
        return [r for r in self.by_pool[pool] if r.state in (_STARTING, _UP)]

    # -- gateway --

    def route(self, i: int, t: float) -> None:
        if not self.ready:
            self.queue.append(i)
            self.queued_at[i] = t
            self.push(t + self.queue_timeout_s, _TIMEOUT, i)
            return
        self.route_seq += 1
        snap = RoutingSnapshot(now=t, seq=self.route_seq, replicas=tuple(
            ReplicaLoad(r.id, r.model.in_flight, r.last_running, r.last_waiting, self.weight[r.pool])
            for r in self.ready.values()))
        choice = self.router.choose(snap, RouteRequest(self.tenant[i], self.model_name, session_key=self.keys[i]))
        r = self.ready[choice] if choice is not None else next(iter(self.ready.values()))
        out = self.output[i]
        try:
            req = r.model.submit_tokens(self.prompt[i], self.blocks[i], max_tokens=out, target_tokens=out)
        except ContextLengthError:
            self.rejected[i] = True
            return
        self.attempt[i] = req
        r.inflight.append((req, i))

    def timeout(self, i: int, t: float) -> None:
        at = self.queued_at.get(i)
        if at is not None and t - at >= self.queue_timeout_s - 1e-9:
            self.queue.remove(i)
            del self.queued_at[i]
            self.dropped[i] = True

    # -- signals and decisions --

    def scrape(self, t: float) -> None:
        wall = self.clock.wall()
        for r in self.ready.values():
            st = r.model.stats()
            m = r.metrics
            key = (m.ttft.count, m.itl.count, m.e2e.count)
            if r.hists is None or r.hists[0] != key:  # the histograms only change at events
                r.hists = (key, _hist(m.ttft), _hist(m.itl), _hist(m.e2e))
            _, ttft, itl, e2e = r.hists
            em = EngineMetrics(engine="sim", requests_running=float(st.running), requests_waiting=float(st.waiting),
                               kv_cache_usage=st.kv_usage, prompt_tokens_total=float(m.prompt_tokens),
                               generation_tokens_total=float(m.generation_tokens),
                               cached_prompt_tokens_total=float(m.prefix_cache_hits),
                               requests_total=float(sum(m.success.values())), ttft_seconds=ttft,
                               tpot_seconds=itl, e2e_seconds=e2e, queue_seconds=None)
            r.last_running, r.last_waiting = em.requests_running, em.requests_waiting
            self.window.add(ReplicaSample.from_metrics(wall, r.id, r.pool, em))
        self.window.add_queue(QueueSample(wall, len(self.queue)))

    def tick(self, t: float) -> None:
        wall = self.clock.wall()
        # A spot pool whose capacity is gone cannot grow: the policy sees it capped at what it has, exactly as
        # the live controller shows it a pool whose provider refused for lack of capacity (fleet/policy/view.py).
        capped = {pool: len(self.live(pool)) for pool, tr in self.spot.items() if not tr.available(t)}
        fleet = constrained(self.fleet, capped=capped)
        decision, self.state = self.policy.decide(fleet, self.window.snapshot(wall), self.catalog, wall,
                                                  self.state)
        self.decisions += 1
        self.apply(decision, t, warm=t == 0.0 and self.initial is None)
        self.record(t)

    def apply(self, decision: Decision, t: float, *, warm: bool = False) -> None:
        for rid in decision.drain:
            r = self.replicas.get(rid)
            if r is not None and r.state in (_STARTING, _UP):
                self.drain(r, t)
        for pool, want in sorted(decision.desired.items()):
            if pool not in self.by_pool:
                continue
            live = self.live(pool)
            if len(live) > want:  # never-ready first, then the newest (a StatefulSet's highest ordinals)
                order = sorted(live, key=lambda r: (r.state != _STARTING, -r.start_s, r.id))
                for r in order[: len(live) - want]:
                    self.drain(r, t)
            elif len(live) < want:
                trace = self.spot.get(pool)
                if trace is not None and not trace.available(t):
                    self.start_failures += want - len(live)
                    continue
                for _ in range(want - len(live)):
                    self.start(pool, t, warm=warm)

    def record(self, t: float) -> None:
        s = self.series
        s["t_s"].append(t)
        s["queue"].append(len(self.queue))
        s["ready"].append(len(self.ready))
        s["cost_usd"].append(self.cost_at(t))
        tiers = {"on-demand": 0, "spot": 0}
        total = 0
        for pool, reps in self.by_pool.items():
            n = sum(1 for r in reps if r.state in (_STARTING, _UP))
            self.by_pool_series[pool].append(n)
            tiers[self.pools[pool].tier] += n
            total += n
        s["replicas"].append(total)
        for tier, n in tiers.items():
            self.by_tier_series[tier].append(n)
        if self.progress is not None:
            self.progress(t, self.trace.duration_s)

    def cost_at(self, t: float) -> float:
        done = math.fsum(b.usd for b in self.billing)
        running = math.fsum(r.usd_per_hour * max(t - r.start_s, 0.0) / 3600.0
                            for r in self.replicas.values() if r.state != _STOPPED)
        return done + running

    def spot_change(self, pool: str, t: float) -> None:
        trace = self.spot[pool]
        if not trace.available(t):
            for r in list(self.by_pool[pool]):
                if r.state in (_STARTING, _UP, _DRAINING):
                    self.preempt(r, t)
        nxt = trace.next_change(t)
        if nxt < math.inf:
            self.push(nxt, _SPOT, pool)

    def all_done(self) -> bool:
        if self.queue:
            return False
        return all(r.model.in_flight == 0 for r in self.replicas.values() if r.state != _STOPPED)

    # -- the loop --

    def run(self) -> None:
        n = len(self.arrival)
        last = self.arrival[-1] if n else 0.0
        if self.initial is not None:
            for pool, k in sorted(self.initial.items()):
                for _ in range(k):
                    self.start(pool, 0.0, warm=True)
        for pool, tr in self.spot.items():
            if pool in self.by_pool:
                self.push(0.0 if not tr.available(0.0) else tr.next_change(0.0), _SPOT, pool)
        self.push(0.0, _SCRAPE)
        self.push(0.0, _TICK)
        i = 0
        events, arrival, clock = self.events, self.arrival, self.clock
        while True:
            ta = arrival[i] if i < n else math.inf
            if events and (events[0][0], events[0][1]) <= (ta, _ARRIVAL):
                t, kind, _, payload = heapq.heappop(events)
            elif i < n:
                t, kind, payload = ta, _ARRIVAL, i
                i += 1
            else:
                break
            if t > clock.now():
                clock.advance(t - clock.now())
            if kind == _ARRIVAL:
                self.route(payload, t)  # type: ignore[arg-type]
            elif kind == _DRAIN:
                self.check_drained(payload, t)  # type: ignore[arg-type]
            elif kind == _TIMEOUT:
                self.timeout(payload, t)  # type: ignore[arg-type]
            elif kind == _READY:
                self.on_ready(payload, t)  # type: ignore[arg-type]
            elif kind == _SCRAPE:
                self.scrape(t)
                self.push(t + self.scrape_s, _SCRAPE)
            elif kind == _TICK:
                self.tick(t)
                if i >= n and (self.all_done() or t > last + _TAIL_LIMIT_S):
                    break
                self.push(t + self.tick_s, _TICK)
            elif kind == _SPOT:
                self.spot_change(payload, t)  # type: ignore[arg-type]
            elif kind == _DEADLINE:
                self.reclaim(payload, t)  # type: ignore[arg-type]
        self.finish(last)

    def finish(self, last_arrival: float) -> None:
        finished = [a.finished_at for a in self.attempt if a is not None and a.finished_at is not None]
        end = self.end = max(last_arrival, max(finished, default=0.0))
        s = self.series
        while s["t_s"] and s["t_s"][-1] > end:  # ticks after the end: the last point is the end itself
            for k in ("t_s", "queue", "cost_usd", "ready", "replicas"):
                s[k].pop()
            for series in (*self.by_pool_series.values(), *self.by_tier_series.values()):
                series.pop()
        self.record(end)
        for r in list(self.replicas.values()):
            if r.state != _STOPPED:
                self.stop(r, max(end, r.start_s))


def simulate(trace: Trace, fleet: ModelFleet, profiles: Mapping[str, EngineProfile], *,
             policy: str | Policy = "default", catalog: Catalog | None = None,
             spot: SpotTrace | Mapping[str, SpotTrace] | None = None, routing: str = "affinity",
             load_factor: float = 1.25, scrape_interval_s: float = 5.0, controller_interval_s: float = 10.0,
             queue_timeout_s: float = 60.0, initial: Mapping[str, int] | None = None, seed: int = 0,
             model_name: str = "model", slo_window_s: float = 300.0, name: str | None = None,
             progress: Callable[[float, float], None] | None = None) -> SimResult:
    """Replay ``trace`` on ``fleet`` under ``policy`` (a fleet policy name or object); see the module docstring.

    ``profiles``: the engine profile of each pool, by pool name. ``spot``: one trace for every spot pool, or
    one per pool name (pools without one never lose capacity). ``initial``: replicas per pool READY at 0
    (default: the policy's first decision, applied warm). ``seed`` is accepted for reproducibility; the
    simulation itself has no randomness (routing ties break on a request counter), so equal inputs give
    equal results. ``progress(t, duration)`` is called at every controller tick.
    """
    del seed  # nothing random: kept in the signature so callers can record it
    if len(trace) == 0:
        raise SimulationError(f"trace {trace.name!r} has no requests")
    if catalog is None:
        catalog = Catalog.builtin()
    pol = load_policy(policy) if isinstance(policy, str) else policy
    if isinstance(spot, SpotTrace):
        spot_map: Mapping[str, SpotTrace] = {p.name: spot for p in fleet.pools if p.tier == "spot"}
    else:
        spot_map = {k: v for k, v in (spot or {}).items() if k in {p.name for p in fleet.pools if p.tier == "spot"}}
    started = time.perf_counter()
    sim = _Sim(trace, fleet, profiles, pol, catalog, spot_map, routing=routing, load_factor=load_factor,
               scrape_interval_s=scrape_interval_s, controller_interval_s=controller_interval_s,
               queue_timeout_s=queue_timeout_s, initial=initial, model_name=model_name, slo_window_s=slo_window_s,
               progress=progress)
    sim.run()
    return _result(sim, name or getattr(pol, "name", "policy"), time.perf_counter() - started)


def _result(sim: _Sim, name: str, wall_s: float) -> SimResult:
    n = len(sim.arrival)
    arrival = sim.trace.arrival_s.astype(np.float64)
    first = np.full(n, np.nan)
    done = np.full(n, np.nan)
    for i, a in enumerate(sim.attempt):
        if a is not None and not sim.rejected[i] and a.finished_at is not None:
            first[i] = a.first_token_at
            done[i] = a.finished_at
    served = np.isfinite(done)
    ttft = first - arrival
    e2e = done - arrival
    out = sim.trace.output_tokens.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (done - first) / (out - 1), np.nan)
    counted = ~sim.rejected
    slo = sim.fleet.slo
    by_pool: dict[str, float] = {p.name: 0.0 for p in sim.fleet.pools}
    by_tier: dict[str, float] = {"on-demand": 0.0, "spot": 0.0}
    for b in sim.billing:
        by_pool[b.pool] += b.usd
        by_tier[b.tier] += b.usd
    series = dict(sim.series)
    series["by_pool"] = sim.by_pool_series
    series["by_tier"] = sim.by_tier_series
    return SimResult(
        policy=name, trace=sim.trace.name, slo={"ttft_s": slo.ttft_p95_s, "tpot_s": slo.tpot_p95_s},
        duration_s=float(sim.end or 0.0), requests=n, completed=int(served.sum()), dropped=int(sim.dropped.sum()),
        rejected=int(sim.rejected.sum()), delayed=int((sim.delayed & served).sum()), retried=sim.retried,
        preemptions=sim.preemptions, start_failures=sim.start_failures, decisions=sim.decisions,
        cost_usd=math.fsum(b.usd for b in sim.billing), cost_by_pool=by_pool, cost_by_tier=by_tier,
        gpu_hours=math.fsum(b.hours * b.gpus for b in sim.billing),
        replica_hours=math.fsum(b.hours for b in sim.billing),
        attainment=attainment(ttft, tpot, served, slo.ttft_p95_s, slo.tpot_p95_s, counted),
        latency=latency_summary(ttft, tpot, e2e), series=series,
        windows=window_attainment(arrival, ttft, tpot, served, counted, slo.ttft_p95_s, slo.tpot_p95_s,
                                  sim.slo_window_s),
        billing=tuple(sim.billing), wall_s=wall_s, arrival_s=arrival, ttft_s=ttft, tpot_s=tpot, e2e_s=e2e,
    )


def _routing_weight(profile: EngineProfile, fleet: ModelFleet, trace: Trace) -> int:
    """A replica's capacity for routing (what ``ReplicaLoad.capacity`` is live: llama.cpp slots there): the batch
    its profile sustains at the fleet's SLO for the trace's mean request, so a mixed fleet is loaded in
    proportion (an A10G is not sent as much as an L40S)."""
    from skyfleet.planner.capacity import replica_capacity

    prompt = float(np.mean(trace.prompt_tokens)) if len(trace) else 0.0
    output = float(np.mean(trace.output_tokens)) if len(trace) else 1.0
    cap = replica_capacity(profile, fleet.slo, mean_prompt_tokens=prompt, mean_output_tokens=output,
                           prefill_interference=0.0)
    return max(1, cap.max_batch)
