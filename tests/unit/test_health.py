"""Health checks: a slow /health on a replica that keeps finishing requests is load, not death."""

from __future__ import annotations

from skyfleet.fleet.health import FAILURES_TO_DEMOTE, HealthChecker
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState


class ScriptedUpstream:
    """Answers health checks with the next scripted result (the real client is tested end to end)."""

    def __init__(self) -> None:
        self.result: tuple[int, str] = (200, "ok")

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        return self.result


def _checker() -> tuple[HealthChecker, ReplicaRegistry, ScriptedUpstream]:
    registry = ReplicaRegistry()
    registry.add(ReplicaSpec(id="r1", base_url="http://127.0.0.1:1", model="m", engine="sim", upstream_model="m"),
                 capacity=4)
    upstream = ScriptedUpstream()
    return HealthChecker(registry, upstream, interval_s=0.5), registry, upstream  # type: ignore[arg-type]


async def test_timeouts_while_requests_complete_keep_the_replica_in_routing() -> None:
    checker, registry, upstream = _checker()
    await checker.check_once()
    assert registry.get("r1").state == ReplicaState.READY  # type: ignore[union-attr]
    upstream.result = (0, "TimeoutError")
    for _ in range(FAILURES_TO_DEMOTE + 3):
        registry.acquire("r1")
        registry.release("r1")  # a request finished since the last check
        await checker.check_once()
    assert registry.get("r1").state == ReplicaState.READY  # type: ignore[union-attr]


async def test_timeouts_with_no_request_finishing_demote_it() -> None:
    checker, registry, upstream = _checker()
    await checker.check_once()
    upstream.result = (0, "TimeoutError")
    registry.acquire("r1")  # in flight, but never finishes: a hung replica
    for _ in range(FAILURES_TO_DEMOTE):
        await checker.check_once()
    assert registry.get("r1").state == ReplicaState.UNHEALTHY  # type: ignore[union-attr]


async def test_refused_connections_demote_it_even_while_requests_complete() -> None:
    checker, registry, upstream = _checker()
    await checker.check_once()
    upstream.result = (0, "ClientConnectorError")
    for _ in range(FAILURES_TO_DEMOTE):
        registry.acquire("r1")
        registry.release("r1")
        await checker.check_once()
    assert registry.get("r1").state == ReplicaState.UNHEALTHY  # type: ignore[union-attr]
