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
  its error kept in :meth:`status`; nothing a provider or the store raises stops the loop.

Not wired into ``skyfleet serve`` yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from skyfleet.clock import Clock
from skyfleet.cost.catalog import Catalog
from skyfleet.engines.metrics import EngineMetrics
from skyfleet.errors import SkyfleetError
from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import Decision, Policy, PolicyState, StateError
from skyfleet.fleet.policy.signals import QueueSample, ReplicaSample, SignalWindow
from skyfleet.fleet.providers.base import FleetProvider
from skyfleet.fleet.spec import FleetSpec

log = logging.getLogger("skyfleet.fleet.controller")

__all__ = ["DecisionStore", "FleetController", "PoolStatus", "pool_key"]


def pool_key(model: str, pool: str) -> str:
    """A pool's key at the provider: ``<model>/<pool>``."""
    return f"{model}/{pool}"


class DecisionStore(Protocol):
    """Where the controller keeps its state and decisions (``skyfleet.state.fleet.FleetRepository``)."""

    async def load_state(self, model: str) -> dict[str, Any] | None: ...

    async def record(self, model: str, at: datetime, *, inputs: Mapping[str, Any], decision: Mapping[str, Any],
                     reason: str, state: Mapping[str, Any]) -> int: ...


@dataclass(slots=True)
class PoolStatus:
    desired: int | None = None  # what the last recorded decision asked for
    applied: int | None = None  # what the provider last accepted
    failures: int = 0  # in a row
    last_error: str | None = None
    retry_at: float | None = None  # clock.now() before which the pool is not tried again


@dataclass(slots=True)
class _Model:
    policy: Policy
    window: SignalWindow
    state: PolicyState = field(default_factory=PolicyState)
    last: Decision | None = None
    record_error: str | None = None


class FleetController:
    def __init__(self, spec: FleetSpec, provider: FleetProvider, store: DecisionStore, catalog: Catalog,
                 clock: Clock, *, interval_s: float = 10.0, retry_base_s: float = 5.0, retry_max_s: float = 300.0,
                 window_horizon_s: float = 900.0) -> None:
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
                m.state = PolicyState.from_json(raw) if raw is not None else PolicyState()
            except StateError as exc:
                log.warning("fleet state unreadable; starting afresh", extra={"model": name, "detail": str(exc)})
                m.state = PolicyState()

    async def tick(self) -> dict[str, Decision]:
        """One round over every model; the decisions made (recorded or not)."""
        out: dict[str, Decision] = {}
        for name, m in self._models.items():
            wall = self._clock.wall()
            spec = self._spec.models[name]
            decision, next_state = m.policy.decide(spec, m.window.snapshot(wall), self._catalog, wall, m.state)
            out[name] = decision
            try:
                await self._store.record(name, datetime.fromtimestamp(wall, UTC), inputs=decision.inputs,
                                         decision=decision.to_json(), reason=decision.reason,
                                         state=next_state.to_json())
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

    async def _act(self, model: str, decision: Decision) -> None:
        for replica_id in decision.drain:
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
                st.retry_at = now + min(self._retry_max_s, self._retry_base_s * 2 ** (st.failures - 1))
                log.warning("scaling a pool failed; will retry", extra={"pool": key, "detail": st.last_error})
                continue
            st.applied, st.failures, st.last_error, st.retry_at = n, 0, None, None

    async def run(self) -> None:
        """Tick forever (until cancelled); an unexpected error in one round is logged, never fatal."""
        while True:
            try:
                await self.tick()
            except Exception:  # one bad round must not end the controller
                log.exception("fleet controller round failed")
            await asyncio.sleep(self._interval_s)

    # -- status --

    def status(self) -> dict[str, Any]:
        """Per model: the last decision and its reason; per pool: desired, applied, error, retry time."""
        models = {}
        for name, m in self._models.items():
            models[name] = {
                "desired": dict(m.last.desired) if m.last else None,
                "reason": m.last.reason if m.last else None,
                "record_error": m.record_error,
                "pools": {p.name: _pool_json(self._pools[pool_key(name, p.name)])
                          for p in self._spec.models[name].pools},
            }
        return models


def _pool_json(st: PoolStatus) -> dict[str, Any]:
    return {"desired": st.desired, "applied": st.applied, "failures": st.failures, "last_error": st.last_error,
            "retry_at": st.retry_at}
