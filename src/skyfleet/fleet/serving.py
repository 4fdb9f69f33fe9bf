"""The fleet controller inside ``skyfleet serve``: the spec's pools, the controller, the cold-start queue.

Built by the composition root (``runtime.py``) when the ``fleet_spec`` setting names a spec, with the provider
``fleet.provider`` names:

* ``local``: the spec is validated against the instance catalog plus the instance type ``local`` (region
  ``local``): a replica process on this machine at ``cost.local_usd_per_hour`` (on-demand) or
  ``fleet.local_spot_usd_per_hour`` (spot); only local pools;
* ``kubernetes``: the StatefulSets ``skyfleet k8s render`` wrote (cloud pools), scaled through their scale
  subresource; the gateway routes to their pods as the rendered ``static_replicas`` (stable DNS names), and a
  preemption notice for a pod takes the static replica with that host out of routing;
* with PostgreSQL, only the gateway holding the advisory lock runs the controller (``fleet/leader.py``);
* one :class:`~skyfleet.fleet.providers.local.LocalPoolSpec` per pool (engine ``llama``, or ``sim`` for the
  simulated engine, with the pool's ``engine_args`` as ``skyfleet engine`` options);
* every model is declared in the registry, so that it is listed and accepted at zero replicas, and its requests
  wait in the :class:`~skyfleet.gateway.admission.ColdStartQueue`, which wakes the controller;
* the hooks: a retiring replica's idle sessions are saved first (``KvState.evacuate``), its cost interval opens
  and closes with it, a preemption notice takes it out of routing at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from skyfleet.clock import Clock
from skyfleet.config import ConfigError, Settings
from skyfleet.cost.catalog import Catalog, PriceOverride
from skyfleet.cost.intervals import ReplicaCostRecorder
from skyfleet.cost.pricing import Pricing
from skyfleet.engines.kvstate import KvRouter
from skyfleet.engines.metrics import EngineMetrics
from skyfleet.fleet.controller import FleetController, pool_key
from skyfleet.fleet.leader import leadership_for
from skyfleet.fleet.providers.base import FleetProvider, PreemptionNotice
from skyfleet.fleet.providers.local import LocalPoolSpec, LocalProvider
from skyfleet.fleet.registry import ReplicaEntry, ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState
from skyfleet.fleet.spec import FleetSpec, load_fleet_spec
from skyfleet.gateway.admission import ColdStartQueue
from skyfleet.state.fleet import FleetRepository

__all__ = ["ServedFleet", "fleet_catalog", "local_pools"]

LOCAL = "local"
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def fleet_catalog(settings: Settings) -> Catalog:
    """The built-in catalog with the settings' price overrides, plus the instance type ``local``."""
    overrides = [PriceOverride(o.instance_type, o.region, o.ondemand_usd_per_hr, o.spot_usd_per_hr)
                 for o in settings.cost.price_overrides]
    return Catalog.builtin().with_overrides(overrides).with_local(settings.cost.local_usd_per_hour,
                                                                  settings.fleet.local_spot_usd_per_hour)


def _engine_args(args: Mapping[str, Any]) -> tuple[str, ...]:
    out: list[str] = []
    for key, value in sorted(args.items()):
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return tuple(out)


def local_pools(spec: FleetSpec, catalog: Catalog) -> list[LocalPoolSpec]:
    """One local pool per pool of the spec; :class:`ConfigError` naming a pool that is not local."""
    out = []
    prefixes: dict[str, str] = {}
    for model, fleet in spec.models.items():
        if fleet.engine not in ("llama", "sim"):
            raise ConfigError(f"fleet spec: models.{model}.engine: `skyfleet serve` runs llama or sim replicas "
                              f"on this machine, not {fleet.engine}; deploy it with `skyfleet k8s render`")
        for i, p in enumerate(fleet.pools):
            if p.instance_type != LOCAL or p.region != LOCAL:
                raise ConfigError(
                    f"fleet spec: models.{model}.pools[{i}]: `skyfleet serve` runs only local pools "
                    f"(instance_type: local, region: local), not {p.instance_type} in {p.region}; deploy cloud "
                    "pools with `skyfleet k8s render` (docs/kubernetes.md)")
            if p.name in prefixes:
                raise ConfigError(f"fleet spec: models.{model}.pools[{i}].name: pool '{p.name}' is also a pool of "
                                  f"model '{prefixes[p.name]}'; local replica ids (<pool>-<n>) must be unique")
            prefixes[p.name] = model
            it = catalog.get(LOCAL, LOCAL)
            usd = it.spot_usd_per_hr if p.tier == "spot" else it.ondemand_usd_per_hr
            out.append(LocalPoolSpec(key=pool_key(model, p.name), model=model, name=p.name, tier=p.tier,
                                     usd_per_hour=usd, engine=fleet.engine, id_prefix=p.name,
                                     engine_args=_engine_args({**fleet.engine_args, **p.engine_args})))
    return out


def held_for_slots(entries: Iterable[ReplicaEntry], model: str) -> int:
    """Requests the gateway holds for ``model`` beyond its ready llama.cpp replicas' slots (the slot manager
    makes them wait here, so the engine's own ``waiting`` does not count them). vLLM and SGLang replicas
    queue what they cannot batch themselves, and their ``waiting`` metric already counts it."""
    return sum(max(0, e.outstanding - e.capacity) for e in entries
               if e.spec.model == model and e.spec.engine == "llama" and e.state == ReplicaState.READY)


@dataclass
class ServedFleet:
    """The fleet controller of one gateway and what it drives: the provider, the cold-start queue, the prices."""

    spec: FleetSpec
    controller: FleetController
    provider: FleetProvider
    admission: ColdStartQueue
    registry: ReplicaRegistry
    prices: dict[str, float | None]  # pool key -> $/hour of one replica
    local: LocalProvider | None = None  # the local provider (preemption can be simulated, cold starts timed)

    def observe(self, replica_id: str, metrics: EngineMetrics) -> None:
        """The health checker's scrape hook: one replica's engine metrics into the controller's window."""
        entry = self.registry.get(replica_id)
        if entry is not None and entry.spec.model in self.spec.models:
            self.controller.observe(entry.spec.model, replica_id, entry.spec.pool, metrics)

    @classmethod
    def build(cls, settings: Settings, *, store_engine: Any, registry: ReplicaRegistry,
              provider: LocalProvider | None, pricing: Pricing, clock: Clock, kv: KvRouter,
              recorder: ReplicaCostRecorder | None, api_client: Any = None) -> ServedFleet:
        """``provider``: the local provider (``fleet.provider: local``); ``api_client``: a Kubernetes client to
        use instead of the environment's (``fleet.provider: kubernetes``; tests pass one)."""
        assert settings.fleet_spec is not None
        f = settings.fleet
        catalog = fleet_catalog(settings)
        spec = load_fleet_spec(settings.fleet_spec, catalog)
        fleet_provider: FleetProvider
        if f.provider == "local":
            assert provider is not None
            prices: dict[str, float | None] = {}
            for pool in local_pools(spec, catalog):
                provider.add_pool(pool)
                prices[pool.key] = pool.usd_per_hour
            fleet_provider = provider
        else:
            fleet_provider, prices = _kubernetes(settings, spec, catalog, api_client)
        admission = ColdStartQueue(registry, clock, frozenset(spec.models), max_wait_s=f.cold_start_max_wait_s,
                                   max_queued=f.cold_start_max_queued)
        for model, fleet in spec.models.items():
            registry.declare(model, settings.local.ctx_per_slot if fleet.engine == "llama" else None)

        def queue_depth(model: str) -> int:
            # The gateway's own queue: requests waiting for a cold start, plus those held for a llama.cpp slot.
            return admission.depth(model) + held_for_slots(registry.entries.values(), model)

        controller = FleetController(spec, fleet_provider, FleetRepository(store_engine), catalog, clock,
                                     interval_s=f.interval_s, retry_base_s=f.retry_base_s, retry_max_s=f.retry_max_s,
                                     queue_depth=queue_depth,
                                     leadership=leadership_for(store_engine, f.leader_lock))
        admission.on_wait.append(lambda _model: controller.poke())

        async def out_of_routing(notice: PreemptionNotice) -> None:
            for rid in _replicas_named(registry, notice.replica_id):
                registry.set_state(rid, ReplicaState.DRAINING, notice.reason)

        controller.on_notice.append(out_of_routing)
        if provider is not None and f.provider == "local":
            async def evacuate(spec: ReplicaSpec) -> None:
                await kv.evacuate(spec)

            async def forget(spec: ReplicaSpec) -> None:
                controller.forget(spec.model, spec.id)

            provider.before_stop.append(evacuate)
            provider.on_removed.append(forget)
            if recorder is not None:
                async def opened(spec: ReplicaSpec) -> None:
                    await recorder.add(pricing.replica_cost(spec.id))

                async def closed(spec: ReplicaSpec) -> None:
                    await recorder.remove(spec.id)

                provider.on_added.append(opened)
                provider.on_removed.append(closed)
        local = provider if f.provider == "local" else None
        return cls(spec, controller, fleet_provider, admission, registry, prices, local)


def _replicas_named(registry: ReplicaRegistry, name: str) -> list[str]:
    """Registry ids of a provider's replica: the same id (local), or the static replica whose host is the pod's
    stable DNS name ``<pod>.<service>.<namespace>.svc...`` (Kubernetes)."""
    if registry.get(name) is not None:
        return [name]
    return [rid for rid, e in registry.entries.items()
            if (urlsplit(e.spec.base_url).hostname or "").split(".", 1)[0] == name]


def _namespace(settings: Settings) -> str:
    if settings.fleet.kubernetes_namespace:
        return settings.fleet.kubernetes_namespace
    try:
        return Path(_SA_NAMESPACE).read_text().strip() or "default"
    except OSError:
        return "default"


def _kubernetes(settings: Settings, spec: FleetSpec, catalog: Catalog,
                api_client: Any) -> tuple[FleetProvider, dict[str, float | None]]:
    from skyfleet.fleet.k8s.provider import KubernetesProvider, client_from_environment, targets_from_spec

    prices: dict[str, float | None] = {}
    for model, fleet in spec.models.items():
        for i, p in enumerate(fleet.pools):
            if p.instance_type == LOCAL:
                raise ConfigError(f"fleet spec: models.{model}.pools[{i}]: instance_type local runs on the gateway's "
                                  "machine, not on Kubernetes (fleet.provider is kubernetes)")
            it = catalog.get(p.instance_type, p.region)
            prices[pool_key(model, p.name)] = (it.spot_usd_per_hr if p.tier == "spot" else it.ondemand_usd_per_hr)
    client = api_client if api_client is not None else client_from_environment()
    return KubernetesProvider(client, _namespace(settings), targets_from_spec(spec)), prices
