"""/admin/v1/fleet: the fleet controller's status, history and manual operations (``skyfleet fleet ...``).

* ``GET /admin/v1/fleet``: per model and pool, desired and ready replicas, tier, $/hour, load, cold starts,
  provider errors and their backoff (fleet:read).
* ``GET /admin/v1/fleet/history``: recorded decisions with their inputs, newest first; ``model``, ``limit``
  (1..1000), ``before`` (an id, to page back) (fleet:read).
* ``POST /admin/v1/fleet/scale``: ``{"model", "pool", "replicas"}`` pins a pool (``null`` releases it) (fleet:manage).
* ``POST /admin/v1/fleet/preempt``: ``{"replica", "notice_s", "capacity_gone_s"}`` simulates a spot reclaim of a
  local replica (fleet:manage).

Without a fleet spec there is no controller: GET answers ``controller: false``; POSTs are refused (409).
Manual operations are audited.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.body import read_json_object, validate
from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.errors import InvalidRequestError, SkyfleetError
from skyfleet.fleet.status import fleet_status
from skyfleet.iam.authz import Permission
from skyfleet.state.fleet import LIST_LIMIT_MAX, FleetRepository


class FleetNotConfiguredError(SkyfleetError):
    status = 409
    code = "fleet_not_configured"


class ScaleFleet(BaseModel):
    """POST /admin/v1/fleet/scale."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200, description="A model of the fleet spec.")
    pool: str = Field(min_length=1, max_length=40, description="One of its pools.")
    replicas: int | None = Field(description="Pin the pool to this many replicas; null: release it to the policy.",
                                 ge=0, le=10_000)


class PreemptReplica(BaseModel):
    """POST /admin/v1/fleet/preempt: simulate a spot reclaim (local provider)."""

    model_config = ConfigDict(extra="forbid")
    replica: str = Field(min_length=1, max_length=100, description="The replica's id, e.g. spot-0.")
    notice_s: float = Field(120.0, gt=0, le=3600, description="Time until it is gone (AWS: 120 s, GCP: 30 s).")
    capacity_gone_s: float = Field(0.0, ge=0, le=86_400, description="For this long the pool cannot start a "
                                   "replacement (no spot capacity): the on-demand fallback takes it.")


def _fleet(request: Request):  # type: ignore[no-untyped-def]
    fleet = gateway(request).fleet
    if fleet is None:
        raise FleetNotConfiguredError("this gateway runs no fleet controller: set the fleet_spec setting")
    return fleet


@requires(Permission.FLEET_READ)
async def get_fleet(request: Request) -> JSONResponse:
    await authenticate(request)
    gw = gateway(request)
    if gw.fleet is None:
        return JSONResponse({"object": "fleet", "controller": False, "models": []})
    return JSONResponse(await fleet_status(gw.fleet, gw.registry, gw.clock))


@requires(Permission.FLEET_READ)
async def get_history(request: Request) -> JSONResponse:
    await authenticate(request)
    gw = gateway(request)
    q = request.query_params
    unknown = sorted(set(q) - {"model", "limit", "before"})
    if unknown:
        raise InvalidRequestError(f"Unrecognized query parameter: {unknown[0][:64]}", param=unknown[0][:64])
    limit, before = _int(q.get("limit"), "limit", 100), _int(q.get("before"), "before", None)
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise InvalidRequestError(f"'limit' must be between 1 and {LIST_LIMIT_MAX}.", param="limit")
    model = q.get("model")
    if model is not None and len(model) > 200:
        raise InvalidRequestError("'model' is too long.", param="model")
    rows = await FleetRepository(gw.store.engine).list_decisions(model, limit=limit, before_id=before)
    data = [{"object": "fleet.decision", "id": r.id, "model": r.model, "at": r.at.isoformat(),
             "reason": r.reason, "decision": r.decision, "inputs": r.inputs} for r in rows]
    return JSONResponse({"object": "list", "data": data, "has_more": len(rows) == limit})


def _int(raw: str | None, name: str, default: int | None) -> int:
    if raw is None:
        return default  # type: ignore[return-value]
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be an integer.", param=name) from None
    if value < 1 or value > 2**62:
        raise InvalidRequestError(f"'{name}' must be a positive integer.", param=name)
    return value


@requires(Permission.FLEET_MANAGE)
async def scale(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    fleet = _fleet(request)
    body = validate(ScaleFleet, await read_json_object(request, gw.settings.max_body_bytes))
    await fleet.controller.scale(body.model, body.pool, body.replicas)
    gw.audit.record("fleet.scale", actor=who, target=f"{body.model}/{body.pool}",
                    replicas=-1 if body.replicas is None else body.replicas)
    return JSONResponse({"object": "fleet.scale", "model": body.model, "pool": body.pool,
                         "pinned": body.replicas})


@requires(Permission.FLEET_MANAGE)
async def preempt(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    fleet = _fleet(request)
    body = validate(PreemptReplica, await read_json_object(request, gw.settings.max_body_bytes))
    if fleet.local is None:
        raise FleetNotConfiguredError("preemption is simulated by the local provider only; on Kubernetes, reclaims "
                                      "come from the cluster (delete or evict the pod to drill one)")
    notice = await fleet.local.preempt(body.replica, notice_s=body.notice_s,
                                          capacity_gone_s=body.capacity_gone_s)
    gw.audit.record("fleet.preempt", actor=who, target=body.replica, notice_s=body.notice_s)
    return JSONResponse({"object": "fleet.preemption", "replica": notice.replica_id, "pool": notice.pool,
                         "deadline": notice.deadline.isoformat(),
                         "notice_s": body.notice_s if math.isfinite(body.notice_s) else None})


routes = [
    Route("/admin/v1/fleet", get_fleet, methods=["GET"]),
    Route("/admin/v1/fleet/history", get_history, methods=["GET"]),
    Route("/admin/v1/fleet/scale", scale, methods=["POST"]),
    Route("/admin/v1/fleet/preempt", preempt, methods=["POST"]),
]
