"""The fleet controller: every ``interval_s``, for each model, window -> policy -> recorded decision -> provider.

* **Signals**: :meth:`FleetController.observe` takes each replica scrape (hook it to
  ``HealthChecker.on_scrape``), :meth:`observe_queue` the gateway's admission queue; one
  :class:`~skyfleet.fleet.policy.signals.SignalWindow` per model, in memory.
* **Decide**: the model's policy (``ModelFleet.policy``) on a frozen snapshot, ``now`` = ``clock.wall()``.
* **Record** the decision, its inputs and the next policy state in one transaction
  (:class:`~skyfleet.state.fleet.FleetRepository`) *before* acting, and keep the new state only if that
  worked: a restarted controller resumes from exactly the state its last actuation was based on.
* **Act** through a :class:`~skyfleet.fleet.providers.base.FleetProvider`, pools keyed ``<model>/<pool>``:
  drain the replicas the decision names, then set each pool's size (idempotent, so every tick reconciles).
  A failing pool is retried with exponential backoff (``retry_base_s`` doubling up to ``retry_max_s``),
  its error kept in :meth:`status` and the metrics; nothing a provider or the store raises stops the loop.
* **Capacity**: a pool whose provider says it has no capacity (:class:`InsufficientCapacityError`, e.g. no spot
  instances) is shown to the policy, until it is retried, as unable to grow past the replicas it has; the
  policy then places the rest in the other pools (spot before on-demand), i.e. the on-demand fallback.
* **Preemption notices** (:meth:`watch_events`, from the provider's ``events()``): recorded in the history,
  passed to ``on_notice`` (the gateway takes the replica out of routing and saves its sessions' KV state), and
  the next round is run at once so that a replacement is asked for.
* **Manual scale** (:meth:`scale`; ``skyfleet fleet scale``): a pool pinned to ``n`` replicas (its min and max,
  for the policy) until released; pins are persisted with the policy state.
* **Wake-up**: :meth:`poke` runs the next round at once (a request waiting in the cold-start queue, a notice).

``skyfleet serve`` runs it when the ``fleet_spec`` setting names a spec (runtime.py), with the local provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from skyfleet.clock import Clock
from skyfleet.cost.catalog import Catalog
from skyfleet.engines.metrics import EngineMetrics
from skyfleet.errors import SkyfleetError
from skyfleet.fleet.leader import Leadership
from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import Decision, Policy, PolicyState, StateError
from skyfleet.fleet.policy.signals import QueueSample, ReplicaSample, SignalWindow
from skyfleet.fleet.policy.view import constrained
from skyfleet.fleet.providers.base import FleetProvider, InsufficientCapacityError, PreemptionNotice
from skyfleet.fleet.replica import ReplicaState
from skyfleet.fleet.spec import FleetSpec, ModelFleet

log = logging.getLogger("skyfleet.fleet.controller")

__all__ = ["DecisionStore", "FleetController", "FleetTargetError", "PoolStatus", "pool_key"]


def pool_key(model: str, pool: str) -> str:
    """A pool's key at the provider: ``<model>/<pool>``."""
    return f"{model}/{pool}"


class DecisionStore(Protocol):
    """Where the controller keeps its state and decisions (``skyfleet.state.fleet.FleetRepository``)."""

    async def load_state(self, model: str) -> dict[str, Any] | None: ...

    async def record(self, model: str, at: datetime, *, inputs: Mapping[str, Any], decision: Mapping[str, Any],
                     reason: str, state: Mapping[str, Any]) -> int: ...

    async def append_decision(self, model: str, at: datetime, *, inputs: Mapping[str, Any],
                              decision: Mapping[str, Any], reason: str) -> int: ...


@dataclass(slots=True)
class PoolStatus:
    desired: int | None = None  # what the last recorded decision asked for
    applied: int | None = None  # what the provider last accepted
    failures: int = 0  # in a row
    last_error: str | None = None
    retry_at: float | None = None  # clock.now() before which the pool is not tried again
    no_capacity: bool = False  # the last failure was a capacity shortage (the policy sees a capped pool)
    capped_at: int | None = None  # replicas it had then: the most it can hold until retried
    preemptions: int = 0


@dataclass(slots=True)
class _Model:
    policy: Policy
    window: SignalWindow
    state: PolicyState = field(default_factory=PolicyState)
    last: Decision | None = None
    record_error: str | None = None
    pins: dict[str, int] = field(default_factory=dict)  # pool -> replicas, set by `skyfleet fleet scale`


class FleetController:
    def __init__(self, spec: FleetSpec, provider: FleetProvider, store: DecisionStore, catalog: Catalog,
                 clock: Clock, *, interval_s: float = 10.0, retry_base_s: float = 5.0, retry_max_s: float = 300.0,
                 window_horizon_s: float = 900.0,
                 queue_depth: Callable[[str], int] | None = None, leadership: Leadership | None = None) -> None:
        self._spec = spec
        self._provider = provider
        self._store = store
        self._catalog = catalog
        self._clock = clock
        self._interval_s = interval_s
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._models = {name: _Model(load_policy(m.policy), SignalWindow(horizon_s=window_horizon_s))
                        for name, m in spec.models.items()}
        self._pools = {pool_key(name, p.name): PoolStatus() for name, m in spec.models.items() for p in m.pools}
        self._queue_depth = queue_depth  # the cold-start queue's depth per model (gateway/admission.py)
        self._leadership = leadership  # fleet/leader.py: only the leader acts (None: always)
        self.leader = leadership is None
        self._wake = asyncio.Event()
        #: called with each preemption notice (the gateway takes the replica out of routing at once)
        self.on_notice: list[Callable[[PreemptionNotice], Awaitable[None]]] = []
        #: called after each round with the controller's status (metrics)
        self.on_status: list[Callable[[dict[str, Any]], None]] = []

    @property
    def spec(self) -> FleetSpec:
        return self._spec

    @property
    def provider(self) -> FleetProvider:
        return self._provider

    # -- signals --

    def observe(self, model: str, replica_id: str, pool: str, metrics: EngineMetrics) -> None:
        m = self._models.get(model)
        if m is not None:
            m.window.add(ReplicaSample.from_metrics(self._clock.wall(), replica_id, pool, metrics))

    def observe_queue(self, model: str, queued: int) -> None:
        m = self._models.get(model)
        if m is not None:
            m.window.add_queue(QueueSample(self._clock.wall(), queued))

    def forget(self, model: str, replica_id: str) -> None:
        m = self._models.get(model)
        if m is not None:
            m.window.forget(replica_id)

    # -- the loop --

    async def start(self) -> None:
        """Load each model's persisted state (a damaged one is replaced by a fresh state, with a warning)."""
        for name, m in self._models.items():
            try:
                raw = await self._store.load_state(name)
                m.state, m.pins = _read_state(raw, self._spec.models[name])
            except StateError as exc:
                log.warning("fleet state unreadable; starting afresh", extra={"model": name, "detail": str(exc)})
                m.state = PolicyState()

    async def tick(self) -> dict[str, Decision]:
        """One round over every model; the decisions made (recorded or not)."""
        out: dict[str, Decision] = {}
        for name, m in self._models.items():
            wall = self._clock.wall()
            if self._queue_depth is not None:
                m.window.add_queue(QueueSample(wall, self._queue_depth(name)))
            spec = await self._view(name, self._spec.models[name], m)
            decision, next_state = m.policy.decide(spec, m.window.snapshot(wall), self._catalog, wall, m.state)
            out[name] = decision
            try:
                await self._store.record(name, datetime.fromtimestamp(wall, UTC), inputs=decision.inputs,
                                         decision=decision.to_json(), reason=decision.reason,
                                         state=_write_state(next_state, m.pins))
            except (SkyfleetError, ValueError) as exc:  # store down / bad inputs: act on nothing unrecorded
                m.record_error = f"{type(exc).__name__}: {exc}"
                log.warning("fleet decision not recorded; not acted on", extra={"model": name,
                                                                                 "detail": m.record_error})
                continue
            m.state, m.last, m.record_error = next_state, decision, None
            if decision.direction:
                log.info("fleet decision", extra={"model": name, "detail": decision.reason})
            await self._act(name, decision)
        return out

    async def _drains(self, model: str, decision: Decision) -> tuple[str, ...]:
        """The replicas to drain. A provider that scales down by removing the highest ordinals (a StatefulSet:
        ``ordered_scale_down``) cannot remove the least loaded replica the policy named: drain the ones it
        will remove instead, the active replicas past the pool's desired size."""
        if not getattr(self._provider, "ordered_scale_down", False):
            return decision.drain
        out: list[str] = []
        for pool, n in sorted(decision.desired.items()):
            try:
                infos = await self._provider.replicas(pool_key(model, pool))
            except (SkyfleetError, OSError):
                continue
            active = sorted((r for r in infos if r.ordinal is not None
                             and r.state not in (ReplicaState.DRAINING, ReplicaState.STOPPED)),
                            key=lambda r: r.ordinal or 0)
            out.extend(r.id for r in active[n:])
        return tuple(out)

    async def _act(self, model: str, decision: Decision) -> None:
        for replica_id in await self._drains(model, decision):
            try:
                await self._provider.drain(replica_id)
            except (SkyfleetError, OSError) as exc:  # providers map their errors to ours at their boundary
                log.warning("drain failed", extra={"model": model, "replica_id": replica_id,
                                                   "detail": f"{type(exc).__name__}: {exc}"})
        now = self._clock.now()
        for pool, n in sorted(decision.desired.items()):
            key = pool_key(model, pool)
            st = self._pools.setdefault(key, PoolStatus())
            st.desired = n
            if st.retry_at is not None and now < st.retry_at:
                continue
            try:
                await self._provider.set_replicas(key, n)
            except (SkyfleetError, OSError) as exc:
                st.failures += 1
                st.last_error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, InsufficientCapacityError) and not st.no_capacity:
                    st.no_capacity, st.capped_at = True, await self._running(key)
                st.retry_at = now + min(self._retry_max_s, self._retry_base_s * 2 ** (st.failures - 1))
                log.warning("scaling a pool failed; will retry", extra={"pool": key, "detail": st.last_error})
                continue
            st.applied, st.failures, st.last_error, st.retry_at = n, 0, None, None
            st.no_capacity, st.capped_at = False, None

    async def _running(self, key: str) -> int:
        """Replicas of a pool that are not going away (what a pool without capacity keeps)."""
        try:
            return sum(1 for r in await self._provider.replicas(key)
                       if r.state not in (ReplicaState.DRAINING, ReplicaState.STOPPED))
        except (SkyfleetError, OSError):
            return 0

    async def _view(self, model: str, spec: ModelFleet, m: _Model) -> ModelFleet:
        """The spec as the policy should see it now (fleet/policy/view.py): pinned pools fixed; a pool without
        capacity, until it is retried, unable to grow past what it had."""
        now = self._clock.now()
        capped = {}
        for p in spec.pools:
            st = self._pools[pool_key(model, p.name)]
            if st.no_capacity and st.capped_at is not None and (st.retry_at is None or now < st.retry_at):
                capped[p.name] = st.capped_at
        return constrained(spec, pins=m.pins, capped=capped)

    # -- operations ---------------------------------------------------------------------------------

    def poke(self) -> None:
        """Run the next round now (a request waits for a cold start; a replica is being preempted)."""
        self._wake.set()

    async def scale(self, model: str, pool: str, n: int | None) -> None:
        """Pin ``model``'s ``pool`` to ``n`` replicas (None: release it to the policy); recorded and persisted."""
        m = self._models.get(model)
        if m is None:
            raise FleetTargetError(f"no model '{model}' in the fleet spec; models: {', '.join(sorted(self._models))}")
        names = [p.name for p in self._spec.models[model].pools]
        if pool not in names:
            raise FleetTargetError(f"model '{model}' has no pool '{pool}'; pools: {', '.join(names)}")
        limit = self._spec.models[model].pool(pool).max
        if n is not None and not 0 <= n <= limit:
            raise FleetTargetError(f"pool '{pool}' holds 0 to {limit} replicas (its max); asked for {n}")
        pins = dict(m.pins)
        if n is None:
            pins.pop(pool, None)
        else:
            pins[pool] = n
        wall = self._clock.wall()
        reason = f"manual: pool {pool} pinned to {n}" if n is not None else f"manual: pool {pool} released"
        await self._store.record(model, datetime.fromtimestamp(wall, UTC), inputs={"now": wall, "pinned": n},
                                 decision={"manual": True, "pool": pool, "pinned": n}, reason=reason,
                                 state=_write_state(m.state, pins))
        m.pins = pins
        self.poke()

    async def on_preemption(self, notice: PreemptionNotice) -> None:
        """A replica is being reclaimed: out of routing (``on_notice``), recorded, a new round at once."""
        for callback in self.on_notice:
            try:
                await callback(notice)
            except Exception:  # one failing hook must not hide the notice from the rest
                log.exception("preemption hook failed", extra={"replica_id": notice.replica_id})
        st = self._pools.get(notice.pool)
        if st is not None:
            st.preemptions += 1
        model = notice.pool.split("/", 1)[0]
        wall = self._clock.wall()
        if not self.leader:  # every gateway takes it out of routing; the leader records it and acts
            return
        try:
            await self._store.append_decision(
                model, datetime.fromtimestamp(wall, UTC),
                inputs={"now": wall, "deadline": notice.deadline.timestamp()},
                decision={"preempted": notice.replica_id, "pool": notice.pool},
                reason=f"{notice.reason}: {notice.replica_id} gone by {notice.deadline.isoformat()}")
        except (SkyfleetError, ValueError) as exc:
            log.warning("preemption not recorded", extra={"replica_id": notice.replica_id, "detail": str(exc)})
        log.warning("replica preempted", extra={"replica_id": notice.replica_id, "pool": notice.pool})
        self.poke()

    async def watch_events(self) -> None:
        """Consume the provider's preemption notices (until cancelled)."""
        async for notice in self._provider.events():
            await self.on_preemption(notice)

    async def run(self, *, first_after_s: float = 0.0) -> None:
        """Tick forever (until cancelled); an unexpected error in one round is logged, never fatal."""
        if first_after_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), first_after_s)
        try:
            while True:
                self._wake.clear()
                await self.round()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
        finally:
            if self._leadership is not None:
                await self._leadership.release()

    async def round(self) -> dict[str, Decision] | None:
        """One round if this gateway leads (taking over: the recorded state is loaded first); the decisions,
        or None when another gateway leads. Never raises for a failing round (it is logged)."""
        if self._leadership is not None:
            was, self.leader = self.leader, await self._leadership.held()
            if not self.leader:
                return None  # another gateway runs the controller; this one only routes and queues
            if not was:  # taking over: resume from what the previous leader recorded
                await self.start()
        try:
            decisions = await self.tick()
            status = self.status()
            for callback in self.on_status:
                callback(status)
            return decisions
        except Exception:  # one bad round must not end the controller
            log.exception("fleet controller round failed")
            return None

    # -- status --

    def status(self) -> dict[str, Any]:
        """Per model: the last decision and its reason; per pool: desired, applied, error, retry time."""
        models = {}
        for name, m in self._models.items():
            models[name] = {
                "desired": dict(m.last.desired) if m.last else None,
                "reason": m.last.reason if m.last else None,
                "record_error": m.record_error,
                "pins": dict(m.pins),
                "pools": {p.name: _pool_json(self._pools[pool_key(name, p.name)])
                          for p in self._spec.models[name].pools},
            }
        return models


def _pool_json(st: PoolStatus) -> dict[str, Any]:
    return {"desired": st.desired, "applied": st.applied, "failures": st.failures, "last_error": st.last_error,
            "retry_at": st.retry_at, "no_capacity": st.no_capacity, "preemptions": st.preemptions}


class FleetTargetError(SkyfleetError):
    """A manual operation names a model, pool or size the fleet spec does not have (404/400 at the API)."""

    status = 400
    code = "invalid_fleet_target"


def _write_state(state: PolicyState, pins: Mapping[str, int]) -> dict[str, Any]:
    """What is persisted per model: the policy's state, and the manual pins beside it."""
    return {"policy": state.to_json(), "pins": dict(sorted(pins.items()))}


def _read_state(raw: Mapping[str, Any] | None, spec: ModelFleet) -> tuple[PolicyState, dict[str, int]]:
    if raw is None:
        return PolicyState(), {}
    if "policy" not in raw:  # the first layout: the policy state alone
        return PolicyState.from_json(raw), {}
    pins = raw.get("pins") or {}
    names = {p.name for p in spec.pools}
    if not isinstance(pins, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                for v in pins.values()):
        raise StateError("unreadable manual pins")
    return PolicyState.from_json(raw["policy"]), {str(k): v for k, v in pins.items() if k in names}
