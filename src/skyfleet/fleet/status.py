"""What ``skyfleet fleet status`` and ``GET /admin/v1/fleet`` show: per model and pool, the controller's view,
the provider's replicas and their load, prices, cold starts and the cold-start queue. Read-only."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from skyfleet.errors import SkyfleetError
from skyfleet.fleet.controller import pool_key
from skyfleet.fleet.replica import ReplicaState

if TYPE_CHECKING:
    from skyfleet.clock import Clock
    from skyfleet.fleet.registry import ReplicaRegistry
    from skyfleet.fleet.serving import ServedFleet

__all__ = ["fleet_status"]

_BILLED = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY, ReplicaState.DRAINING)


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat() if t is not None else None


async def fleet_status(fleet: ServedFleet, registry: ReplicaRegistry, clock: Clock) -> dict[str, Any]:
    controller = fleet.controller.status()
    now = clock.now()
    models: dict[str, Any] = {}
    for name, model in fleet.spec.models.items():
        c = controller[name]
        pools = []
        model_usd = 0.0
        for p in model.pools:
            key = pool_key(name, p.name)
            st = c["pools"][p.name]
            price = fleet.prices.get(key)
            try:
                infos = await fleet.provider.replicas(key)
                provider_error = None
            except SkyfleetError as exc:
                infos, provider_error = [], exc.message
            replicas = []
            for r in infos:
                e = registry.get(r.id)
                replicas.append({
                    "id": r.id, "state": r.state.value, "ordinal": r.ordinal, "started_at": _iso(r.started_at),
                    "deadline": _iso(r.deadline), "detail": r.detail,
                    "outstanding": e.outstanding if e else 0, "running": e.engine_running if e else 0.0,
                    "waiting": e.engine_waiting if e else 0.0, "kv_cache_usage": e.kv_cache_usage if e else None,
                })
            billed = sum(1 for r in infos if r.state in _BILLED)
            usd = billed * (price or 0.0)
            model_usd += usd
            colds = fleet.local.cold_starts(key) if fleet.local is not None else []
            retry_at = st["retry_at"]
            pools.append({
                "pool": p.name, "tier": p.tier, "instance_type": p.instance_type, "region": p.region,
                "min": p.min, "max": p.max, "pinned": c["pins"].get(p.name), "desired": st["desired"],
                "applied": st["applied"], "ready": sum(1 for r in infos if r.state == ReplicaState.READY),
                "usd_per_hour_each": price, "usd_per_hour": round(usd, 6),
                "failures": st["failures"], "last_error": st["last_error"] or provider_error,
                "retry_in_s": None if retry_at is None else max(0.0, round(retry_at - now, 1)),
                "no_capacity": st["no_capacity"], "preemptions": st["preemptions"],
                "cold_start_s": {"last": round(colds[-1], 3) if colds else None,
                                 "mean": round(sum(colds) / len(colds), 3) if colds else None, "count": len(colds)},
                "replicas": replicas,
            })
        models[name] = {
            "model": name, "policy": model.policy, "desired": c["desired"], "reason": c["reason"],
            "record_error": c["record_error"], "queued": fleet.admission.depth(name),
            "usd_per_hour": round(model_usd, 6), "pools": pools,
        }
    return {"object": "fleet", "controller": True, "provider": "local" if fleet.local is not None else "kubernetes",
            "leader": fleet.controller.leader, "models": list(models.values())}
