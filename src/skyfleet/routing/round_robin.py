"""Round robin over the candidates (a baseline for benchmarks; it ignores load and sessions)."""

from __future__ import annotations

from skyfleet.routing.policy import RouteRequest, RoutingSnapshot


class RoundRobin:
    def choose(self, snapshot: RoutingSnapshot, request: RouteRequest) -> str | None:
        candidates = sorted(r.replica_id for r in snapshot.replicas if r.replica_id not in request.exclude)
        if not candidates:
            return None
        return candidates[snapshot.seq % len(candidates)]
