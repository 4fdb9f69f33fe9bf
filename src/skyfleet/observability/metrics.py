"""Gateway metrics (Prometheus), in a registry owned by the app (no global default registry).

Label cardinality is bounded: ``tenant`` takes at most ``max_tenants`` distinct values (later
ones are reported as ``other``); ``model`` comes from the configured model list only.

Cost metrics use OpenCost's label names where they mean the same thing: a replica's machine is a
``node`` with its ``instance_type`` and ``region`` (as in OpenCost's ``node_total_hourly_cost``);
``tier`` plays the part of OpenCost's spot flag (``kubecost_node_is_spot``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaState
from skyfleet.gateway.context import RequestRecord

if TYPE_CHECKING:
    from skyfleet.cost.pricing import ReplicaCost
    from skyfleet.fleet.serving import ServedFleet

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class BoundedLabel:
    def __init__(self, limit: int, overflow: str = "other") -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._overflow = overflow

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return self._overflow


class GatewayMetrics:
    """Implements :class:`skyfleet.gateway.context.RequestObserver` for Prometheus."""

    def __init__(self, registry: ReplicaRegistry, *, max_tenants: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._replicas = registry
        self._tenant = BoundedLabel(max_tenants)
        r = self.registry
        self.requests = Counter(
            "skyfleet_requests", "Requests finished, by outcome.", ["tenant", "model", "route", "status", "code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "skyfleet_prompt_tokens", "Prompt tokens processed.", ["tenant", "model"], registry=r
        )
        self.cached_tokens = Counter(
            "skyfleet_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", ["tenant", "model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "skyfleet_completion_tokens", "Completion tokens generated.", ["tenant", "model"], registry=r
        )
        self.ttft = Histogram(
            "skyfleet_time_to_first_token_seconds", "Time to the first streamed event.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "skyfleet_request_duration_seconds", "End-to-end request latency at the gateway.", ["model", "route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.retries = Counter("skyfleet_upstream_retries", "Requests retried on another replica.", registry=r)
        self.auth_failures = Counter("skyfleet_auth_failures", "Requests refused for their credential.", registry=r)
        self.client_errors = Counter(
            "skyfleet_client_errors", "Requests refused before routing, by error code.", ["code"], registry=r
        )
        self.replica_states = Gauge(
            "skyfleet_replicas", "Replicas by model and state.", ["model", "state"], registry=r
        )
        self.inflight = Gauge("skyfleet_inflight_requests", "Requests in flight to replicas.", registry=r)
        # -- cost (cost/metering.py, cost/pricing.py) --
        self.cost_usd = Counter(
            "skyfleet_cost_usd", "Charged cost of finished requests in USD (usage_records.charged_usd_micros).",
            ["tenant", "model"], registry=r)
        self.pool_cost_per_hour = Gauge(
            "skyfleet_pool_cost_usd_per_hour", "Hourly price of the replicas this gateway routes to, per pool.",
            ["pool"], registry=r)
        self.replica_cost_per_hour = Gauge(
            "skyfleet_replica_cost_usd_per_hour", "Hourly price of one replica (like OpenCost's "
            "node_total_hourly_cost).", ["node", "pool", "instance_type", "region", "tier"], registry=r)
        self.usage_dropped = Counter(
            "skyfleet_usage_dropped", "Usage records dropped because the metering queue was full.", registry=r)
        self.usage_write_errors = Counter(
            "skyfleet_usage_write_errors", "Failed writes of a usage batch (retried).", registry=r)

    def on_finish(self, rec: RequestRecord) -> None:
        tenant = self._tenant(rec.tenant_name)
        self.requests.labels(tenant, rec.model, rec.route, rec.status, rec.error_code or "").inc()
        if rec.prompt_tokens:
            self.prompt_tokens.labels(tenant, rec.model).inc(rec.prompt_tokens)
        if rec.cached_tokens:
            self.cached_tokens.labels(tenant, rec.model).inc(rec.cached_tokens)
        if rec.completion_tokens:
            self.completion_tokens.labels(tenant, rec.model).inc(rec.completion_tokens)
        if rec.ttft_s is not None:
            self.ttft.labels(rec.model).observe(rec.ttft_s)
        self.latency.labels(rec.model, rec.route).observe(rec.duration_s)
        if rec.attempts > 1:
            self.retries.inc()

    def observe_charge(self, rec: RequestRecord, micros: int) -> None:
        """A request's charged cost (called by the metering when it prices the record)."""
        self.cost_usd.labels(self._tenant(rec.tenant_name), rec.model).inc(micros / 1e6)

    def set_prices(self, costs: Iterable[ReplicaCost]) -> None:
        """The hourly price of each replica and pool (set once at start; prices are fixed by the settings)."""
        pools: dict[str, float] = {}
        for c in costs:
            usd = c.usd_per_hour or 0.0
            pools[c.pool] = pools.get(c.pool, 0.0) + usd
            self.replica_cost_per_hour.labels(c.replica_id, c.pool, c.instance_type or "", c.region or "",
                                              c.tier).set(usd)
        for pool, usd in pools.items():
            self.pool_cost_per_hour.labels(pool).set(usd)

    def watch_fleet(self, fleet: ServedFleet) -> None:
        """The fleet controller's numbers: desired and ready replicas per pool, provider failures (with their
        backoff), preemptions, cold starts, and the cold-start queue."""
        r = self.registry
        desired = Gauge("skyfleet_fleet_desired_replicas", "Replicas the controller wants, per pool.",
                        ["model", "pool"], registry=r)
        failures = Gauge("skyfleet_fleet_pool_failures", "Provider failures in a row, per pool (0: healthy; "
                         "retried with backoff).", ["model", "pool"], registry=r)
        no_capacity = Gauge("skyfleet_fleet_pool_no_capacity", "1 while a pool's provider reports no capacity.",
                            ["model", "pool"], registry=r)
        preemptions = Gauge("skyfleet_fleet_preemptions", "Preemption notices received, per pool.",
                            ["model", "pool"], registry=r)
        queue = Gauge("skyfleet_cold_start_queue_depth", "Requests waiting for a replica to start.", ["model"],
                      registry=r)
        waits = Histogram("skyfleet_cold_start_wait_seconds", "Time requests waited for a replica to start, by "
                          "outcome.", ["model", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        cold = Histogram("skyfleet_fleet_cold_start_seconds", "From asking for a replica to READY.", ["pool"],
                         buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=r)

        def on_status(status: dict[str, Any]) -> None:
            for model, m in status.items():
                queue.labels(model).set(fleet.admission.depth(model))
                for pool, p in m["pools"].items():
                    desired.labels(model, pool).set(p["desired"] or 0)
                    failures.labels(model, pool).set(p["failures"])
                    no_capacity.labels(model, pool).set(1 if p["no_capacity"] else 0)
                    preemptions.labels(model, pool).set(p["preemptions"])

        def on_wait_done(model: str, waited: float, served: bool) -> None:
            waits.labels(model, "served" if served else "timed_out").observe(waited)
            queue.labels(model).set(fleet.admission.depth(model))

        fleet.controller.on_status.append(on_status)
        fleet.admission.on_done.append(on_wait_done)
        if fleet.local is not None:
            fleet.local.on_cold_start.append(lambda pool, seconds: cold.labels(pool).observe(seconds))

    def render(self) -> bytes:
        counts: dict[tuple[str, str], int] = {}
        inflight = 0
        for entry in self._replicas.entries.values():
            key = (entry.spec.model, entry.state.value)
            counts[key] = counts.get(key, 0) + 1
            inflight += entry.outstanding
        for model in self._replicas.models():
            for state in ReplicaState:
                self.replica_states.labels(model, state.value).set(counts.get((model, state.value), 0))
        self.inflight.set(inflight)
        return generate_latest(self.registry)
