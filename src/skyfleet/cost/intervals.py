"""Replica cost intervals and utilisation samples, recorded by each gateway.

* **Intervals** (``replica_intervals``): a replica's life at one price. The gateway opens one per
  priced replica at start (owner = its instance id for the replicas it runs, whose ids repeat
  across gateways; owner ``static`` for configured external replicas, shared: see
  :func:`skyfleet.state.usage.adopt_static_interval`), refreshes their heartbeat every
  ``cost.interval_heartbeat_s``, and closes its own at shutdown (static ones are left to their
  heartbeat: another gateway may still use the replica). A crashed gateway's intervals end at
  their last heartbeat (closed so by the next gateway to start, and read so by the reports).
  A local replica costs from the gateway's start to its stop, restarts included: the machine it
  runs on is paid for either way. API-priced replicas (tier ``api``) have no interval.
* **Samples** (``replica_samples``): every ``cost.sample_interval_s``, each ready replica's
  running and waiting requests and KV-cache use (the health checker's latest ``/metrics`` scrape),
  its busy fraction (share of the health checker's rounds in which it had a request in flight,
  seen by this gateway or reported by the engine) and tokens/s (prompt + generated tokens, from the
  engine's counters between scrapes). Static replicas' samples are keyed to the interval's start
  so several gateways write one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from skyfleet.clock import Clock
from skyfleet.cost.pricing import Pricing, ReplicaCost
from skyfleet.engines.metrics import EngineMetrics
from skyfleet.errors import SkyfleetError
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaState
from skyfleet.state import usage as store
from skyfleet.state.usage import STATIC_OWNER, IntervalSpec

log = logging.getLogger("skyfleet.cost")

#: An open interval whose heartbeat is older than this belongs to a gateway that died.
STALE_AFTER = timedelta(minutes=5)


def new_instance_id() -> str:
    """A gateway instance's id: the owner of the replica intervals it records."""
    return "gw-" + secrets.token_hex(6)


def _spec(owner: str, cost: ReplicaCost) -> IntervalSpec:
    return IntervalSpec(owner=owner, replica_id=cost.replica_id, pool=cost.pool, model=cost.model,
                        engine=cost.engine or "unknown", instance_type=cost.instance_type, region=cost.region,
                        tier=cost.tier, usd_per_hour=float(cost.usd_per_hour or 0.0))


@dataclass(slots=True)
class _Tracked:
    cost: ReplicaCost
    spec: IntervalSpec
    interval_id: str | None = None


@dataclass(slots=True)
class _Utilisation:
    rounds: int = 0
    busy_rounds: int = 0
    metrics: EngineMetrics | None = None
    first_tokens: tuple[float, float] | None = None  # (loop time, token counter) of the period's first scrape
    last_tokens: tuple[float, float] | None = None


def _token_total(m: EngineMetrics) -> float | None:
    if m.prompt_tokens_total is None and m.generation_tokens_total is None:
        return None
    return (m.prompt_tokens_total or 0.0) + (m.generation_tokens_total or 0.0)


class ReplicaCostRecorder:
    def __init__(self, engine: AsyncEngine, pricing: Pricing, registry: ReplicaRegistry, clock: Clock, *,
                 owner: str, heartbeat_s: float, sample_interval_s: float, tick_s: float = 0.5) -> None:
        self._engine = engine
        self._pricing = pricing
        self._registry = registry
        self._clock = clock
        self.owner = owner
        self._heartbeat_s = heartbeat_s
        self._sample_s = sample_interval_s
        self._tick_s = min(tick_s, sample_interval_s)
        # Local replicas are this gateway's; any other priced replica is shared (owner "static").
        self._tracked = {c.replica_id: _Tracked(c, _spec(owner if c.tier == "local" else STATIC_OWNER, c))
                         for c in pricing.replica_costs() if c.usd_per_hour is not None}
        self._util: dict[str, _Utilisation] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)

    @property
    def interval_ids(self) -> dict[str, str]:
        return {rid: t.interval_id for rid, t in self._tracked.items() if t.interval_id is not None}

    # -- intervals -------------------------------------------------------------------------------
    async def _open(self, t: _Tracked, now: datetime) -> None:
        iid = "ri_" + secrets.token_hex(12)
        if t.spec.owner == STATIC_OWNER:
            t.interval_id = await store.adopt_static_interval(self._engine, iid, t.spec, now, now - STALE_AFTER)
        else:
            await store.open_interval(self._engine, iid, t.spec, now)
            t.interval_id = iid

    async def open_all(self) -> None:
        """Close dead gateways' intervals, then open (or adopt) one per priced replica."""
        now = self._now()
        closed = await store.close_stale_intervals(self._engine, heartbeat_before=now - STALE_AFTER)
        if closed:
            log.info("closed replica intervals of gateways that stopped heart-beating", extra={"closed": closed})
        for t in self._tracked.values():
            await self._open(t, now)

    async def beat(self) -> None:
        """Refresh heartbeats; reopen an interval that is gone (a static one another gateway merged)."""
        now = self._now()
        alive = await store.heartbeat(self._engine, self.interval_ids.values(), now)
        for t in self._tracked.values():
            if t.interval_id is None or t.interval_id not in alive:
                await self._open(t, now)

    async def close_all(self) -> None:
        """Close this gateway's intervals now (static ones only get a last heartbeat)."""
        now = self._now()
        own = [t.interval_id for t in self._tracked.values() if t.interval_id and t.spec.owner != STATIC_OWNER]
        shared = [t.interval_id for t in self._tracked.values() if t.interval_id and t.spec.owner == STATIC_OWNER]
        await store.close_intervals(self._engine, own, now)
        await store.heartbeat(self._engine, shared, now)

    async def add(self, cost: ReplicaCost) -> None:
        """A replica the fleet controller started: its interval opens now (this gateway owns it)."""
        if cost.usd_per_hour is None or cost.replica_id in self._tracked:
            return
        t = _Tracked(cost, _spec(self.owner, cost))
        self._tracked[cost.replica_id] = t
        try:
            await self._open(t, self._now())
        except SkyfleetError as exc:  # the next heartbeat opens it
            log.warning("replica interval not opened; retrying", extra={"error_code": exc.code})

    async def remove(self, replica_id: str) -> None:
        """A replica the fleet controller stopped: its interval ends now."""
        t = self._tracked.pop(replica_id, None)
        self._util.pop(replica_id, None)
        if t is None or t.interval_id is None:
            return
        try:
            await store.close_intervals(self._engine, [t.interval_id], self._now())
        except SkyfleetError as exc:  # it ends at its last heartbeat
            log.warning("replica interval not closed", extra={"error_code": exc.code})

    # -- samples ---------------------------------------------------------------------------------
    def on_scrape(self, replica_id: str, metrics: EngineMetrics) -> None:
        """The health checker's hook: the latest parsed ``/metrics`` of a replica (no I/O here)."""
        u = self._util.setdefault(replica_id, _Utilisation())
        u.metrics = metrics
        total = _token_total(metrics)
        if total is not None:
            point = (asyncio.get_running_loop().time(), total)
            if u.first_tokens is None:
                u.first_tokens = point
            u.last_tokens = point

    def tick(self) -> None:
        """One utilisation round: which ready replicas have work in flight now."""
        for rid, entry in self._registry.entries.items():
            if entry.state != ReplicaState.READY:
                continue
            u = self._util.setdefault(rid, _Utilisation())
            u.rounds += 1
            if entry.outstanding > 0 or entry.engine_running > 0:
                u.busy_rounds += 1

    def take_samples(self, now: datetime) -> list[dict[str, Any]]:
        """One sample per replica seen this period; resets the period."""
        rows = []
        for rid, u in self._util.items():
            if u.rounds == 0:
                continue
            entry = self._registry.get(rid)
            t = self._tracked.get(rid)
            owner = t.spec.owner if t is not None else self.owner
            pool = t.cost.pool if t is not None else (entry.spec.pool if entry is not None else "unknown")
            at = now
            if owner == STATIC_OWNER:  # several gateways sample it: one row per period
                step = max(1, int(self._sample_s))
                at = datetime.fromtimestamp(int(now.timestamp()) // step * step, UTC)
            tps = None
            if u.first_tokens and u.last_tokens and u.last_tokens[0] > u.first_tokens[0]:
                delta = u.last_tokens[1] - u.first_tokens[1]
                if delta >= 0:  # a counter reset (engine restart) gives no rate
                    tps = delta / (u.last_tokens[0] - u.first_tokens[0])
            m = u.metrics
            rows.append({"owner": owner, "replica_id": rid, "at": at, "pool": pool,
                         "running": m.requests_running if m else (entry.outstanding if entry else None),
                         "waiting": m.requests_waiting if m else None,
                         "kv_cache_usage": m.kv_cache_usage if m else None,
                         "busy_fraction": u.busy_rounds / u.rounds, "tokens_per_s": tps})
            self._util[rid] = _Utilisation(metrics=m, first_tokens=u.last_tokens, last_tokens=u.last_tokens)
        return rows

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.open_all()
        except SkyfleetError as exc:
            log.warning("replica cost intervals could not be opened; retrying", extra={"error_code": exc.code})
        self._tasks = [asyncio.create_task(self._heartbeats(), name="cost-intervals"),
                       asyncio.create_task(self._samples(), name="cost-samples")]

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self.beat()
            except SkyfleetError as exc:
                log.warning("replica interval heartbeat failed", extra={"error_code": exc.code})

    async def _samples(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._sample_s
        while True:
            await asyncio.sleep(self._tick_s)
            self.tick()
            if loop.time() < next_at:
                continue
            next_at += self._sample_s
            rows = self.take_samples(self._now())
            try:
                await store.insert_samples(self._engine, rows)
            except SkyfleetError as exc:
                log.warning("replica samples not stored", extra={"error_code": exc.code, "samples": len(rows)})

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.close_all()
        except SkyfleetError as exc:
            log.warning("replica intervals not closed (they end at their last heartbeat)",
                        extra={"error_code": exc.code})
