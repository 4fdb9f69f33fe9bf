"""The routing seam: a snapshot of candidate replicas in, one replica id (or none) out.

Policies are pure functions of the snapshot (which carries ``now``). They never see sockets,
processes or the database, so the simulator replays them unchanged and tests drive them with
plain data. Session affinity and tenant-partitioned prefix routing are further policies behind
the same :class:`RoutingPolicy` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One routable replica as a policy sees it."""

    replica_id: str
    outstanding: int  # requests this gateway has in flight to it
    engine_running: float = 0.0  # from the engine's /metrics (may lag)
    engine_waiting: float = 0.0
    capacity: int = 1  # parallel sequences it serves (llama.cpp slots)


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    now: float
    replicas: tuple[ReplicaLoad, ...]  # only replicas that serve the model and are READY
    seq: int = 0  # a request counter; policies may use it to break ties deterministically


@dataclass(frozen=True, slots=True)
class RouteRequest:
    tenant_id: str
    model: str
    session_key: str | None = None  # for affinity policies
    exclude: frozenset[str] = frozenset()  # replicas already tried for this request


class RoutingPolicy(Protocol):
    def choose(self, snapshot: RoutingSnapshot, request: RouteRequest) -> str | None:
        """The replica to use, or None when no candidate is left."""
        ...
