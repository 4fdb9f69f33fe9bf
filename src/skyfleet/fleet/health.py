"""Health checks for every replica: promote to READY on success, demote after repeated failures."""

from __future__ import annotations

import asyncio
import logging

from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaState
from skyfleet.gateway.upstream import UpstreamClient

log = logging.getLogger("skyfleet.health")

#: Failed checks in a row before a READY replica leaves routing.
FAILURES_TO_DEMOTE = 2


class HealthChecker:
    def __init__(self, registry: ReplicaRegistry, upstream: UpstreamClient, *, interval_s: float) -> None:
        self._registry = registry
        self._upstream = upstream
        self._interval_s = interval_s

    async def check_once(self) -> None:
        entries = [
            e for e in self._registry.entries.values()
            if e.state in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY)
        ]
        timeout = max(0.2, min(1.0, self._interval_s * 2))
        results = await asyncio.gather(*(self._upstream.get_text(e.spec.health_url, timeout) for e in entries))
        for entry, (status, detail) in zip(entries, results, strict=True):
            if self._registry.get(entry.spec.id) is not entry:
                continue  # replaced while we were checking
            if status == 200:
                if entry.state != ReplicaState.READY:
                    log.info("replica ready", extra={"replica_id": entry.spec.id})
                self._registry.set_state(entry.spec.id, ReplicaState.READY)
                continue
            entry.consecutive_failures += 1
            if entry.state == ReplicaState.READY and entry.consecutive_failures >= FAILURES_TO_DEMOTE:
                log.warning("replica unhealthy", extra={"replica_id": entry.spec.id, "detail": f"{status}"})
                self._registry.set_state(entry.spec.id, ReplicaState.UNHEALTHY, f"health check: {status or detail}")

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)
