"""What a replica is: an OpenAI-compatible HTTP endpoint plus a Prometheus ``/metrics`` endpoint."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReplicaState(enum.StrEnum):
    STARTING = "starting"  # process launched, not yet healthy
    READY = "ready"  # healthy, in routing
    UNHEALTHY = "unhealthy"  # failed checks or a connection; out of routing until healthy again
    DRAINING = "draining"  # finishing in-flight work, no new requests
    STOPPED = "stopped"  # gone (process exited / removed)


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """The static description of one replica; its live state is kept by the registry."""

    id: str
    base_url: str  # e.g. http://127.0.0.1:41234 (no /v1)
    model: str  # name clients use
    engine: str  # llama | vllm | sglang | sim
    upstream_model: str  # name the engine expects in the body
    context_window: int | None = None
    pool: str = "local"
    tier: str = "local"  # spot | on-demand | reserved | api | local (external: unpriced static replica)
    instance_type: str | None = None  # cloud instance type (cost catalog), if known
    region: str | None = None  # cloud region, if known
    usd_per_hour: float | None = None  # price of the replica (None: unpriced, or API-priced per token)
    api_key: str | None = field(default=None, repr=False)

    @property
    def metrics_url(self) -> str:
        return self.base_url + "/metrics"

    @property
    def health_url(self) -> str:
        return self.base_url + "/health"
