"""What the fleet controller asks of a provider: the ``FleetProvider`` protocol.

A provider owns the replicas of one or more pools (processes on this machine, pods of a
Kubernetes StatefulSet, ...). The controller's policy decides; the actuator calls a provider to
carry the decision out. Everything here is small on purpose:

* ``set_replicas(pool, n)``: make the pool's desired size ``n`` (idempotent; returns at once, the
  replicas start or stop in the background). Which replicas go on a scale-down is the provider's
  rule (a StatefulSet removes its highest ordinals; ``ReplicaInfo.ordinal``): drain those first.
* ``replicas(pool)``: the pool's replicas as the provider sees them now (:class:`ReplicaInfo`).
* ``drain(replica_id)``: mark one replica as going away (the controller has already taken it out
  of routing); it keeps running until the provider removes it.
* ``delete_replica(replica_id)``: remove one replica now (graceful: the engine gets its grace
  period); a pool below its desired size replaces it.
* ``events()``: an async iterator of :class:`PreemptionNotice` (a spot reclaim, a node drain):
  the replica will be gone by ``deadline``.

Errors a provider raises (mapped at its boundary, never a client library's own exception):
:class:`PoolNotFoundError` / :class:`ReplicaNotFoundError` (404: no such pool or replica),
:class:`ProviderUnavailableError` (503: the provider's API is unreachable or failing after
retries with backoff), :class:`InsufficientCapacityError` (a ProviderUnavailableError: the pool's tier has
no capacity now, e.g. no spot instances). They are OpenAI-shaped (``skyfleet.errors``) so the admin API can show them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from skyfleet.errors import NotFoundError, ServiceUnavailableError
from skyfleet.fleet.replica import ReplicaState


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One replica of a pool as its provider sees it."""

    id: str  # unique within the provider (Kubernetes: the pod name, e.g. llama-8b-spot-0)
    pool: str
    state: ReplicaState  # STARTING (not ready yet), READY, DRAINING (terminating), STOPPED (failed)
    base_url: str | None = None  # the engine's HTTP endpoint once known (no /v1)
    ordinal: int | None = None  # StatefulSet ordinal; scale-down removes the highest first
    node: str | None = None  # where it runs (Kubernetes node name), if known
    started_at: datetime | None = None
    #: When a termination is under way: the time by which the replica is gone.
    deadline: datetime | None = None
    detail: str = ""  # why it is in that state (a pod's phase/reason), for status output


@dataclass(frozen=True, slots=True)
class PreemptionNotice:
    """A replica is being taken away by the platform (spot reclaim, node drain), not by the controller."""

    replica_id: str
    pool: str
    deadline: datetime  # gone by then (AWS: ~2 min after the notice; GCP: ~30 s)
    reason: str = "preempted"
    extra: dict[str, str] = field(default_factory=dict)


class PoolNotFoundError(NotFoundError):
    code = "pool_not_found"


class ReplicaNotFoundError(NotFoundError):
    code = "replica_not_found"


class ProviderUnavailableError(ServiceUnavailableError):
    def __init__(self, message: str, *, retry_after_s: int = 5, code: str = "provider_unavailable") -> None:
        super().__init__(message, retry_after_s=retry_after_s, code=code)


class InsufficientCapacityError(ProviderUnavailableError):
    """The pool's capacity tier has no room now (a spot capacity shortage): the controller places the
    replicas in its other pools (spot before on-demand, as always) until the pool is retried."""

    def __init__(self, message: str, *, retry_after_s: int = 30) -> None:
        super().__init__(message, retry_after_s=retry_after_s, code="insufficient_capacity")


@runtime_checkable
class FleetProvider(Protocol):
    """Carries out the controller's decisions for the pools it owns."""

    async def set_replicas(self, pool: str, n: int) -> None:
        """Make ``n`` the pool's desired number of replicas (idempotent)."""
        ...

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        """The pool's replicas now, lowest ordinal first (a scale-down removes the last ones)."""
        ...

    async def drain(self, replica_id: str) -> None:
        """Mark a replica as leaving (already out of routing); it is removed by a scale-down or delete."""
        ...

    async def delete_replica(self, replica_id: str) -> None:
        """Remove one replica now, gracefully; the pool replaces it if it is below its desired size."""
        ...

    def events(self) -> AsyncIterator[PreemptionNotice]:
        """Preemption notices, as they are seen (each replica's termination reported once)."""
        ...
