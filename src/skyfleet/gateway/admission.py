"""The cold-start queue: requests for a model with no ready replica wait here while one starts.

A model the fleet controller manages may have no READY replica: scaled to zero, or every replica was
preempted at once, or all are still starting. Instead of failing at once, a request waits, bounded:

* at most ``max_wait_s`` (default 60 s); past that it gets ``503 no_replica_available`` with
  ``Retry-After`` (a cold start is under way; the client should come back);
* at most ``max_queued`` requests per model wait; more get the 503 at once;
* a request that starts waiting wakes the controller (``on_wait``), so that a model asleep at zero
  starts a replica now rather than at the controller's next round. The controller reads the queue
  depth (:meth:`depth`) as one of its signals.

Models not managed by the controller (fixed local replicas, static engines) never wait: their 503 is
immediate, as before. The waiting is on the registry's change notification, never polling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from skyfleet.clock import Clock
from skyfleet.errors import NoReplicaAvailableError
from skyfleet.fleet.registry import ReplicaRegistry

__all__ = ["ColdStartQueue"]


@dataclass
class ColdStartQueue:
    registry: ReplicaRegistry
    clock: Clock
    models: frozenset[str]  # the models that wait for a cold start (the fleet spec's)
    max_wait_s: float = 60.0
    max_queued: int = 1000
    #: called with the model each time a request starts waiting (wakes the controller)
    on_wait: list[Callable[[str], None]] = field(default_factory=list)
    #: called with (model, seconds waited, served) when a wait ends (metrics)
    on_done: list[Callable[[str, float, bool], None]] = field(default_factory=list)
    _depth: dict[str, int] = field(default_factory=dict)

    def depth(self, model: str) -> int:
        """Requests waiting now for a replica of ``model``."""
        return self._depth.get(model, 0)

    def manages(self, model: str) -> bool:
        return model in self.models

    async def wait_for_replica(self, model: str) -> None:
        """Return once ``model`` has a READY replica; :class:`NoReplicaAvailableError` (503 + Retry-After)
        after ``max_wait_s``, or at once when the queue is full or the model is not managed."""
        if self.registry.ready_count(model) > 0:
            return
        if not self.manages(model):
            raise NoReplicaAvailableError(f"no replica of '{model}' is ready; try again shortly")
        if self.depth(model) >= self.max_queued:
            raise NoReplicaAvailableError(
                f"no replica of '{model}' is ready and {self.max_queued} requests already wait for one; "
                "try again shortly", retry_after_s=max(1, round(self.max_wait_s / 2)))
        started = self.clock.now()
        deadline = started + self.max_wait_s
        self._depth[model] = self.depth(model) + 1
        served = False
        try:
            for callback in self.on_wait:
                callback(model)
            while self.registry.ready_count(model) == 0:
                left = deadline - self.clock.now()
                if left <= 0:
                    break
                await self.registry.wait_changed(left)
            served = self.registry.ready_count(model) > 0
        finally:
            self._depth[model] -= 1
            for done in self.on_done:
                done(model, self.clock.now() - started, served)
        if not served:
            raise NoReplicaAvailableError(
                f"no replica of '{model}' became ready within {self.max_wait_s:g} s (a replica is starting); "
                "try again shortly", retry_after_s=max(1, round(self.max_wait_s / 4)))
