"""Static replicas: engines skyfleet routes to but does not run (e.g. vLLM on a GPU host)."""

from __future__ import annotations

from skyfleet.config import StaticReplica
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec


def register_static(replicas: tuple[StaticReplica, ...], registry: ReplicaRegistry) -> None:
    """Add each configured replica as STARTING; the health checker promotes it."""
    for i, r in enumerate(replicas):
        registry.add(
            ReplicaSpec(
                id=f"static-{i}",
                base_url=r.url,
                model=r.model,
                engine=r.engine,
                upstream_model=r.upstream_model or r.model,
                context_window=r.context_window,
                pool="static",
                tier="external",
                api_key=r.api_key.get_secret_value() if r.api_key else None,
            ),
            capacity=8,
        )
