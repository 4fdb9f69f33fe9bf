"""The composition root: builds every long-lived part of a gateway from the settings, starts and stops them.

Nothing is global: the ASGI app holds one :class:`Gateway` and passes it to handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from skyfleet.audit import Audit, DiscardAudit
from skyfleet.clock import Clock, SystemClock
from skyfleet.config import Settings
from skyfleet.crypto import LocalKeyProvider
from skyfleet.engines.kvstate import KvRouter, LlamaSlots
from skyfleet.errors import SkyfleetError
from skyfleet.fleet.health import HealthChecker
from skyfleet.fleet.providers.local import LocalProvider
from skyfleet.fleet.providers.static import register_static
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.gateway.auth import Authenticator
from skyfleet.gateway.proxy import Proxy
from skyfleet.gateway.upstream import UpstreamClient
from skyfleet.observability.metrics import GatewayMetrics
from skyfleet.routing import make_policy
from skyfleet.state.conversations import sweep_expired, tenant_retention
from skyfleet.state.repositories import Store

log = logging.getLogger("skyfleet.gateway")


@dataclass
class Gateway:
    settings: Settings
    store: Store
    clock: Clock
    registry: ReplicaRegistry
    upstream: UpstreamClient
    auth: Authenticator
    metrics: GatewayMetrics
    proxy: Proxy
    local: LocalProvider | None
    health: HealthChecker
    audit: Audit = field(default_factory=DiscardAudit)
    accepting: bool = True
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def create(cls, settings: Settings, clock: Clock | None = None) -> Gateway:
        clock = clock or SystemClock()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        provider = await asyncio.to_thread(LocalKeyProvider.open, settings.key_path)
        store = await Store.open(settings.database_url_value, key_provider=provider, clock=clock)
        registry = ReplicaRegistry()
        upstream = UpstreamClient(
            connect_timeout_s=settings.connect_timeout_s,
            request_timeout_s=settings.request_timeout_s,
            pool_size=settings.upstream_pool_size,
        )
        metrics = GatewayMetrics(registry, max_tenants=settings.metrics_max_tenants)
        auth = Authenticator(store.keys, clock, ttl_s=settings.auth_cache_ttl_s, admin_key=settings.admin_key)
        kv = KvRouter({
            "llama": LlamaSlots(upstream, settings.data_dir.resolve() / "slots", clock,
                                slots_per_replica=settings.local.slots,
                                save_every_turn=settings.local.save_kv_every_turn),
        } if settings.local.kv_slot_manager else {})
        registry.on_stopped.append(kv.replica_gone)
        proxy = Proxy(
            registry=registry, policy=make_policy(settings.routing.policy, settings.routing.load_factor), upstream=upstream, clock=clock, observer=metrics,
            kv=kv,
        )
        local = (
            LocalProvider(settings.local, registry, settings.data_dir.resolve())
            if settings.local.replicas > 0
            else None
        )
        health = HealthChecker(registry, upstream, interval_s=settings.health_interval_s)
        return cls(settings, store, clock, registry, upstream, auth, metrics, proxy, local, health)

    async def start(self) -> None:
        await self.upstream.start()
        register_static(self.settings.static_replicas, self.registry)
        if self.local is not None:
            await self.local.start()
        self._tasks = [
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(self.auth.watch_revocations(self.settings.revocation_poll_s), name="revocations"),
            asyncio.create_task(self._sweep_retention(), name="retention"),
        ]

    async def _sweep_retention(self) -> None:
        """Delete conversations and responses past their tenant's retention, periodically."""
        while True:
            try:
                retention = await tenant_retention(self.store.engine)
                deleted = await sweep_expired(self.store.engine, now=datetime.now(UTC), retention=retention)
                if deleted:
                    log.info("retention sweep", extra={"deleted": deleted})
            except SkyfleetError as exc:
                log.warning("retention sweep failed", extra={"error_code": exc.code})
            await asyncio.sleep(self.settings.retention_sweep_interval_s)

    def stop_accepting(self) -> None:
        self.accepting = False

    async def stop(self) -> None:
        self.accepting = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.local is not None:
            await self.local.stop()
        await self.upstream.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every model has at least one READY replica (or there are no replicas)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            models = self.registry.models()
            if all(self.registry.ready_count(m) > 0 for m in models):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.registry.wait_changed(min(left, 0.5))
