"""Pure routing policies: ``choose(snapshot, request) -> decision``. No I/O, no clocks of their own."""

from skyfleet.routing.least_load import LeastOutstandingRequests
from skyfleet.routing.policy import ReplicaLoad, RouteRequest, RoutingPolicy, RoutingSnapshot

__all__ = ["LeastOutstandingRequests", "ReplicaLoad", "RouteRequest", "RoutingPolicy", "RoutingSnapshot"]
