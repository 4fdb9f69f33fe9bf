"""Pure routing policies: ``choose(snapshot, request) -> replica id``. No I/O, no clocks of their own."""

from skyfleet.routing.affinity import PrefixAffinity, SessionAffinity, prefix_key, prefix_key_from_text
from skyfleet.routing.least_load import LeastOutstandingRequests
from skyfleet.routing.policy import ReplicaLoad, RouteRequest, RoutingPolicy, RoutingSnapshot
from skyfleet.routing.round_robin import RoundRobin

__all__ = [
    "LeastOutstandingRequests",
    "PrefixAffinity",
    "ReplicaLoad",
    "RoundRobin",
    "RouteRequest",
    "RoutingPolicy",
    "RoutingSnapshot",
    "SessionAffinity",
    "make_policy",
    "prefix_key",
    "prefix_key_from_text",
]


def make_policy(name: str, load_factor: float) -> RoutingPolicy:
    if name == "affinity":
        return SessionAffinity(load_factor=load_factor)
    if name == "least-load":
        return LeastOutstandingRequests()
    if name == "round-robin":
        return RoundRobin()
    raise ValueError(f"unknown routing policy {name!r}")
