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
from skyfleet.audit.log import AuditLog
from skyfleet.clock import Clock, SystemClock
from skyfleet.config import Settings
from skyfleet.cost.budget_gate import BudgetGate
from skyfleet.cost.intervals import ReplicaCostRecorder, new_instance_id
from skyfleet.cost.metering import DiscardUsage, UsageSink, UsageWriter
from skyfleet.cost.pricing import Pricing
from skyfleet.crypto import open_key_provider
from skyfleet.engines.kvseal import SlotSealer
from skyfleet.engines.kvstate import KvRouter, LlamaSlots, SoleTenantCache
from skyfleet.errors import SkyfleetError
from skyfleet.fleet.health import HealthChecker
from skyfleet.fleet.providers.local import LocalProvider
from skyfleet.fleet.providers.static import register_static
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.serving import ServedFleet
from skyfleet.gateway.auth import Authenticator
from skyfleet.gateway.cache_salt import CacheSalter, load_or_create_secret
from skyfleet.gateway.context import CompositeObserver
from skyfleet.gateway.proxy import Proxy
from skyfleet.gateway.ratelimit import RateLimiter
from skyfleet.gateway.upstream import UpstreamClient
from skyfleet.observability.metrics import GatewayMetrics
from skyfleet.routing import make_policy
from skyfleet.state.audit import AuditRepository
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
    limits: RateLimiter = field(default_factory=RateLimiter.default)
    budgets: BudgetGate = field(default_factory=BudgetGate.disabled)
    pricing: Pricing | None = None  # cost/pricing.py: every replica's price, every request's charge
    usage: UsageSink = field(default_factory=DiscardUsage)  # cost/metering.py: one usage record per request
    cost_recorder: ReplicaCostRecorder | None = None  # cost/intervals.py: replica intervals and samples
    instance_id: str = field(default_factory=new_instance_id)  # owner of the replica intervals this gateway records
    fleet: ServedFleet | None = None  # fleet/serving.py: the fleet controller and its local pools (fleet_spec)
    kv: KvRouter = field(default_factory=lambda: KvRouter({}))  # engines/kvstate.py: KV state per session
    accepting: bool = True
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def create(cls, settings: Settings, clock: Clock | None = None) -> Gateway:
        clock = clock or SystemClock()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        provider = await asyncio.to_thread(open_key_provider, settings)  # settings.keys: local, KMS or Vault
        store = await Store.open(settings.database_url_value, key_provider=provider, clock=clock)
        registry = ReplicaRegistry()
        upstream = UpstreamClient(
            connect_timeout_s=settings.connect_timeout_s,
            request_timeout_s=settings.request_timeout_s,
            pool_size=settings.upstream_pool_size,
        )
        metrics = GatewayMetrics(registry, max_tenants=settings.metrics_max_tenants)
        limits = RateLimiter.from_settings(
            settings.limits, settings.redis_url.get_secret_value() if settings.redis_url else None, clock,
            metrics.registry)
        oidc = None
        if settings.oidc.issuer:
            from skyfleet.iam.oidc import OidcVerifier

            oidc = OidcVerifier(settings.oidc, store.tenants, clock)
        auth = Authenticator(store.keys, clock, ttl_s=settings.auth_cache_ttl_s, admin_key=settings.admin_key,
                             trusted_proxies=settings.trusted_proxies, oidc=oidc)
        slot_dir = settings.data_dir.resolve() / "slots"
        kv = KvRouter({
            "llama": LlamaSlots(upstream, slot_dir, clock, slots_per_replica=settings.local.slots,
                                save_every_turn=settings.local.save_kv_every_turn,
                                sealer=SlotSealer(slot_dir, store.keyring)),
        } if settings.local.kv_slot_manager else {"llama": SoleTenantCache()})
        salt_secret = (settings.cache_salt_secret.get_secret_value().encode() if settings.cache_salt_secret
                       else await asyncio.to_thread(load_or_create_secret,
                                                    settings.data_dir / "keys" / "cache-salt.key"))
        registry.on_stopped.append(kv.replica_gone)
        # cost/pricing.py (reads the catalog): charges (metering) and reservations (budgets)
        pricing = await asyncio.to_thread(Pricing.from_settings, settings)
        budgets = BudgetGate.from_settings(settings, store.engine, pricing, clock, metrics.registry)
        c = settings.cost
        instance_id = new_instance_id()  # owner of this gateway's replica intervals and usage records
        usage = UsageWriter(store.engine, pricing, clock, owner=instance_id, batch_size=c.usage_batch_size,
                            flush_interval_s=c.usage_flush_interval_s, max_pending=c.usage_max_pending,
                            on_charge=metrics.observe_charge, on_drop=metrics.usage_dropped.inc,
                            on_write_error=metrics.usage_write_errors.inc)
        local = (
            LocalProvider(settings.local, registry, settings.data_dir.resolve(), pricing, clock,
                          grace_s=settings.fleet.drain_grace_s)
            if settings.local.replicas > 0 or (settings.fleet_spec is not None and settings.fleet.provider == "local")
            else None
        )
        recorder = ReplicaCostRecorder(store.engine, pricing, registry, clock, owner=instance_id,
                                       heartbeat_s=c.interval_heartbeat_s, sample_interval_s=c.sample_interval_s,
                                       tick_s=settings.health_interval_s)
        fleet = None
        if settings.fleet_spec is not None:
            fleet = ServedFleet.build(settings, store_engine=store.engine, registry=registry, provider=local,
                                     pricing=pricing, clock=clock, kv=kv, recorder=recorder)
        proxy = Proxy(
            registry=registry, policy=make_policy(settings.routing.policy, settings.routing.load_factor), upstream=upstream, clock=clock,
            observer=CompositeObserver(metrics, limits, budgets, usage),
            salter=CacheSalter(salt_secret), kv=kv, admission=fleet.admission if fleet is not None else None,
        )
        health = HealthChecker(registry, upstream, interval_s=settings.health_interval_s)
        audit = AuditLog(AuditRepository(store.engine), clock, registry=metrics.registry)
        health.on_scrape.append(recorder.on_scrape)
        if fleet is not None:
            health.on_scrape.append(fleet.observe)
            metrics.watch_fleet(fleet)
        metrics.set_prices(pricing.replica_costs())
        return cls(settings, store, clock, registry, upstream, auth, metrics, proxy, local, health,
                   limits=limits, audit=audit, budgets=budgets, pricing=pricing, usage=usage,
                   cost_recorder=recorder, instance_id=instance_id, fleet=fleet, kv=kv)

    async def start(self) -> None:
        await self.upstream.start()
        await self.limits.start()
        await self.budgets.start()
        await self.usage.start()
        await register_static(self.settings.static_replicas, self.registry, self.upstream, self.pricing)
        if self.local is not None:
            await self.local.start()
        if self.cost_recorder is not None:
            await self.cost_recorder.start()
        fleet_tasks = []
        if self.fleet is not None:
            await self.fleet.controller.start()  # the persisted state: a restart resumes without churn
            await self.fleet.controller.round()  # the leader asks for the first replicas before readiness
            fleet_tasks = [
                asyncio.create_task(self.fleet.controller.run(first_after_s=self.settings.fleet.interval_s),
                                    name="fleet-controller"),
                asyncio.create_task(self.fleet.controller.watch_events(), name="fleet-events"),
            ]
        self._tasks = [*fleet_tasks,
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(self.auth.watch_revocations(self.settings.revocation_poll_s), name="revocations"),
            asyncio.create_task(self._sweep_retention(), name="retention"),
        ]
        if isinstance(self.audit, AuditLog):
            self.audit.start()

    async def _sweep_retention(self) -> None:
        """Delete conversations and responses past their tenant's retention, periodically."""
        while True:
            try:
                retention = await tenant_retention(self.store.engine)
                deleted = await sweep_expired(self.store.engine, now=datetime.now(UTC), retention=retention)
                if deleted:
                    log.info("retention sweep", extra={"deleted": deleted})
                    self.audit.record("retention.sweep", actor=None, deleted=deleted)
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
        await self.usage.close()  # every queued usage record, before the store closes (cost/metering.py)
        if self.cost_recorder is not None:
            await self.cost_recorder.close()  # this gateway's replica intervals end now
        if isinstance(self.audit, AuditLog):
            await self.audit.close()  # the last batch and key-use window, before the store closes
        await self.limits.close()
        await self.budgets.close()  # the last settlements, before the store closes
        await self.auth.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every model has at least one READY replica (or there are no replicas)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            models = self.registry.models_with_replicas()  # a model scaled to zero has none to wait for
            if all(self.registry.ready_count(m) > 0 for m in models):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self.registry.wait_changed(min(left, 0.5))
