"""The live replica set: specs, states and in-flight counts, shared by routing, health and providers.

Single-threaded by design (it lives on the gateway's event loop); no locks needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from skyfleet.fleet.replica import ReplicaSpec, ReplicaState
from skyfleet.routing.policy import ReplicaLoad, RoutingSnapshot


@dataclass(slots=True)
class ReplicaEntry:
    spec: ReplicaSpec
    state: ReplicaState = ReplicaState.STARTING
    outstanding: int = 0
    capacity: int = 1
    engine_running: float = 0.0
    engine_waiting: float = 0.0
    kv_cache_usage: float | None = None
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    consecutive_failures: int = 0
    served: int = 0
    #: Requests completed (released) so far; the health checker compares it between rounds.
    completed: int = 0
    completed_at_check: int = 0


@dataclass(slots=True)
class ReplicaRegistry:
    entries: dict[str, ReplicaEntry] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _seq: int = 0
    _models: list[str] | None = None  # cached; membership changes reset it
    #: models served even with no replica now (a fleet spec's, scaled to zero), with their context window
    declared: dict[str, int | None] = field(default_factory=dict)
    #: called with the replica id when a replica stops (its process, and any state in it, is gone)
    on_stopped: list[Callable[[str], None]] = field(default_factory=list)
    #: called with the replica id each time a replica becomes READY (providers time cold starts with it)
    on_ready: list[Callable[[str], None]] = field(default_factory=list)

    # -- membership -------------------------------------------------------------------------
    def add(self, spec: ReplicaSpec, *, capacity: int = 1, state: ReplicaState = ReplicaState.STARTING) -> ReplicaEntry:
        entry = ReplicaEntry(spec=spec, capacity=capacity, state=state)
        self.entries[spec.id] = entry
        self._notify()
        return entry

    def replace_spec(self, spec: ReplicaSpec) -> None:
        """A restarted replica may come back on a new port; keep its counters."""
        self.entries[spec.id].spec = spec
        self._notify()

    def remove(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)
        self._notify()

    def set_state(self, replica_id: str, state: ReplicaState, error: str | None = None) -> None:
        entry = self.entries.get(replica_id)
        if entry is None or entry.state == state:
            return
        entry.state = state
        if error is not None:
            entry.last_error = error
        if state == ReplicaState.STOPPED:
            for callback in self.on_stopped:
                callback(replica_id)
        if state == ReplicaState.READY:
            entry.consecutive_failures = 0
            for callback in self.on_ready:
                callback(replica_id)
        self._notify()

    def mark_failed(self, replica_id: str, error: str) -> None:
        """A request could not reach the replica: take it out of routing until a health check passes."""
        entry = self.entries.get(replica_id)
        if entry is not None and entry.state == ReplicaState.READY:
            self.set_state(replica_id, ReplicaState.UNHEALTHY, error)

    # -- queries ----------------------------------------------------------------------------
    def get(self, replica_id: str) -> ReplicaEntry | None:
        return self.entries.get(replica_id)

    def declare(self, model: str, context_window: int | None = None) -> None:
        """Serve ``model`` even while it has no replica (requests then wait for a cold start)."""
        self.declared[model] = context_window
        self._notify()

    def models(self) -> list[str]:
        if self._models is None:
            self._models = sorted({e.spec.model for e in self.entries.values()} | set(self.declared))
        return self._models

    def models_with_replicas(self) -> list[str]:
        return sorted({e.spec.model for e in self.entries.values()})

    def context_window(self, model: str) -> int | None:
        windows = [e.spec.context_window for e in self.entries.values() if e.spec.model == model]
        known = [w for w in windows if w]
        if not known and self.declared.get(model):
            known = [self.declared[model]]  # type: ignore[list-item]
        return min(known) if known else None

    def ready_count(self, model: str | None = None) -> int:
        return sum(
            1
            for e in self.entries.values()
            if e.state == ReplicaState.READY and (model is None or e.spec.model == model)
        )

    def snapshot(self, model: str, now: float) -> RoutingSnapshot:
        self._seq += 1
        loads = tuple(
            ReplicaLoad(
                replica_id=e.spec.id,
                outstanding=e.outstanding,
                engine_running=e.engine_running,
                engine_waiting=e.engine_waiting,
                capacity=e.capacity,
            )
            for e in self.entries.values()
            if e.state == ReplicaState.READY and e.spec.model == model
        )
        return RoutingSnapshot(now=now, replicas=loads, seq=self._seq)

    # -- in-flight accounting ---------------------------------------------------------------
    def acquire(self, replica_id: str) -> None:
        entry = self.entries.get(replica_id)
        if entry is not None:
            entry.outstanding += 1
            entry.served += 1

    def release(self, replica_id: str) -> None:
        entry = self.entries.get(replica_id)
        if entry is not None and entry.outstanding > 0:
            entry.outstanding -= 1
            entry.completed += 1

    # -- change notification ----------------------------------------------------------------
    def _notify(self) -> None:
        self._models = None
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, within_s: float) -> None:
        """Return when the registry changes, or after ``within_s`` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), within_s)
