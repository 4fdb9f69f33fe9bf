"""Least outstanding requests, normalised by capacity; ties broken by a rotating index."""

from __future__ import annotations

from skyfleet.routing.policy import ReplicaLoad, RouteRequest, RoutingSnapshot


def _load(r: ReplicaLoad) -> float:
    # The gateway's own count is exact and immediate; the engine's queue (waiting) also counts
    # work sent by other gateways. Normalise by capacity so a 4-slot replica takes 4x the work.
    return (r.outstanding + r.engine_waiting) / max(1, r.capacity)


class LeastOutstandingRequests:
    """Pick the candidate with the least load per unit of capacity.

    Ties rotate with the snapshot's ``seq``, so an idle fleet is filled evenly rather than
    always from the first replica.
    """

    def choose(self, snapshot: RoutingSnapshot, request: RouteRequest) -> str | None:
        candidates = [r for r in snapshot.replicas if r.replica_id not in request.exclude]
        if not candidates:
            return None
        best = min(_load(r) for r in candidates)
        tied = [r for r in candidates if _load(r) == best]
        return tied[snapshot.seq % len(tied)].replica_id
