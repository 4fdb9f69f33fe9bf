"""Liveness and readiness (public, no tenant data); Prometheus metrics (fleet:read: they name tenants)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from skyfleet.api.deps import gateway, public, requires
from skyfleet.iam.authz import Permission


@public
async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


@public
async def readyz(request: Request) -> JSONResponse:
    gw = gateway(request)
    models = {m: gw.registry.ready_count(m) for m in gw.registry.models()}
    db_ok = await gw.store.ping()
    # A model the fleet controller manages is ready at zero replicas: its requests wait for a cold start
    # (a load balancer that took the gateway out of rotation would keep it asleep for good).
    ready = (gw.accepting and db_ok and bool(models)
             and all(n > 0 or m in gw.registry.declared for m, n in models.items()))
    body = {"status": "ready" if ready else "not_ready", "accepting": gw.accepting, "database": db_ok,
            "ready_replicas": models}
    return JSONResponse(body, status_code=200 if ready else 503)


@requires(Permission.FLEET_READ)
async def metrics(request: Request) -> Response:
    return Response(gateway(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
