"""Health checks for every replica: promote to READY on success, demote after repeated failures.

Every ``scrape_every`` rounds the checker also reads each ready replica's ``/metrics`` through
the engine adapters (:mod:`skyfleet.engines.metrics`), so routing sees the engines' own queues
(work sent by other gateways included). Parsing runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from skyfleet.engines.metrics import EngineMetrics, MetricsParseError, parse_metrics
from skyfleet.fleet.registry import ReplicaEntry, ReplicaRegistry
from skyfleet.fleet.replica import ReplicaState
from skyfleet.gateway.upstream import UpstreamClient

log = logging.getLogger("skyfleet.health")

#: Failed checks in a row before a READY replica leaves routing.
FAILURES_TO_DEMOTE = 2
#: How UpstreamClient.get_text names a timed-out check.
_TIMEOUTS = frozenset({"TimeoutError", "ServerTimeoutError", "ConnectionTimeoutError"})


class HealthChecker:
    def __init__(
        self, registry: ReplicaRegistry, upstream: UpstreamClient, *, interval_s: float, scrape_every: int = 4
    ) -> None:
        self._registry = registry
        self._upstream = upstream
        self._interval_s = interval_s
        self._scrape_every = scrape_every
        #: Called with (replica id, parsed metrics) after each successful scrape (e.g. utilisation samples).
        self.on_scrape: list[Callable[[str, EngineMetrics], None]] = []

    async def scrape_once(self) -> None:
        entries = [e for e in self._registry.entries.values() if e.state == ReplicaState.READY]
        texts = await asyncio.gather(*(self._upstream.get_text(e.spec.metrics_url, 2.0) for e in entries))
        for entry, (status, text) in zip(entries, texts, strict=True):
            if status != 200:
                continue
            # Parse in a worker thread; apply here, on the loop that owns the registry.
            m = await asyncio.to_thread(self._parse, entry, text)
            if m is None or self._registry.get(entry.spec.id) is not entry:
                continue
            entry.engine_running = m.requests_running
            entry.engine_waiting = m.requests_waiting
            entry.kv_cache_usage = m.kv_cache_usage
            for callback in self.on_scrape:
                callback(entry.spec.id, m)

    @staticmethod
    def _parse(entry: ReplicaEntry, text: str) -> EngineMetrics | None:
        try:
            return parse_metrics(entry.spec.engine, text, model=entry.spec.upstream_model)  # type: ignore[arg-type]
        except (MetricsParseError, ValueError):
            return None

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
            answering = entry.completed > entry.completed_at_check
            entry.completed_at_check = entry.completed
            if status == 200:
                if entry.state != ReplicaState.READY:
                    log.info("replica ready", extra={"replica_id": entry.spec.id})
                self._registry.set_state(entry.spec.id, ReplicaState.READY)
                continue
            if status == 0 and detail in _TIMEOUTS and answering:
                # A slow /health on a replica that keeps finishing requests is load (ours or its own),
                # not death: a dead one fails its requests' connections, which the proxy reports at once.
                continue
            entry.consecutive_failures += 1
            if entry.state == ReplicaState.READY and entry.consecutive_failures >= FAILURES_TO_DEMOTE:
                log.warning("replica unhealthy", extra={"replica_id": entry.spec.id, "detail": f"{status}"})
                self._registry.set_state(entry.spec.id, ReplicaState.UNHEALTHY, f"health check: {status or detail}")

    async def run(self) -> None:
        rounds = 0
        while True:
            await self.check_once()
            rounds += 1
            if rounds % self._scrape_every == 0:
                await self.scrape_once()
            await asyncio.sleep(self._interval_s)
