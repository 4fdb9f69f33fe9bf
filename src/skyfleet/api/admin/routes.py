"""/admin/v1/*: tenants, keys and replicas. Every route needs a platform-admin key."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.admin.schema import CreateKey, CreateTenant, key_json, tenant_json
from skyfleet.api.body import read_json_object, validate
from skyfleet.api.deps import authenticate_admin, gateway

log = logging.getLogger("skyfleet.admin")


async def list_tenants(request: Request) -> JSONResponse:
    await authenticate_admin(request)
    tenants = await gateway(request).store.tenants.list()
    return JSONResponse({"object": "list", "data": [tenant_json(t) for t in tenants]})


async def create_tenant(request: Request) -> JSONResponse:
    who = await authenticate_admin(request)
    gw = gateway(request)
    body = validate(CreateTenant, await read_json_object(request, gw.settings.max_body_bytes))
    tenant = await gw.store.tenants.create(body.name)
    log.info("tenant created", extra={"tenant_id": tenant.id, "by_key_id": who.key_id})
    return JSONResponse(tenant_json(tenant), status_code=201)


async def get_tenant(request: Request) -> JSONResponse:
    await authenticate_admin(request)
    return JSONResponse(tenant_json(await gateway(request).store.tenants.get(request.path_params["name"])))


async def delete_tenant(request: Request) -> JSONResponse:
    who = await authenticate_admin(request)
    name = request.path_params["name"]
    tenant = await gateway(request).store.tenants.get(name)
    store = gateway(request).store
    await store.tenants.delete(name)
    await store.keyring.shred(tenant.id)  # crypto-shredding: its stored data can never be decrypted again
    log.info("tenant deleted and shredded", extra={"tenant_id": tenant.id, "by_key_id": who.key_id})
    return JSONResponse({"object": "tenant.deleted", "id": tenant.id, "name": name, "deleted": True})


async def list_keys(request: Request) -> JSONResponse:
    await authenticate_admin(request)
    keys = await gateway(request).store.keys.list(request.query_params.get("tenant"))
    return JSONResponse({"object": "list", "data": [key_json(k) for k in keys]})


async def create_key(request: Request) -> JSONResponse:
    who = await authenticate_admin(request)
    gw = gateway(request)
    body = validate(CreateKey, await read_json_object(request, gw.settings.max_body_bytes))
    plaintext, record = await gw.store.keys.create(
        body.tenant, role=body.role, name=body.name, expires_at=body.expires_at
    )
    log.info("key created", extra={"key_id": record.id, "tenant_id": record.tenant_id, "by_key_id": who.key_id})
    return JSONResponse({**key_json(record), "key": plaintext}, status_code=201)


async def revoke_key(request: Request) -> JSONResponse:
    who = await authenticate_admin(request)
    record = await gateway(request).store.keys.revoke(request.path_params["key_id"])
    log.info("key revoked", extra={"key_id": record.id, "by_key_id": who.key_id})
    return JSONResponse(key_json(record))


async def list_replicas(request: Request) -> JSONResponse:
    await authenticate_admin(request)
    gw = gateway(request)
    data = [
        {
            "object": "replica", "id": e.spec.id, "model": e.spec.model, "engine": e.spec.engine,
            "url": e.spec.base_url, "state": e.state.value, "pool": e.spec.pool, "tier": e.spec.tier,
            "pid": e.pid, "outstanding": e.outstanding, "capacity": e.capacity, "restarts": e.restarts,
            "served": e.served, "last_error": e.last_error,
            "engine_load": {"running": e.engine_running, "waiting": e.engine_waiting, "kv_cache_usage": e.kv_cache_usage},
        }
        for e in gw.registry.entries.values()
    ]
    return JSONResponse({"object": "list", "data": data})


routes = [
    Route("/admin/v1/tenants", list_tenants, methods=["GET"]),
    Route("/admin/v1/tenants", create_tenant, methods=["POST"]),
    Route("/admin/v1/tenants/{name}", get_tenant, methods=["GET"]),
    Route("/admin/v1/tenants/{name}", delete_tenant, methods=["DELETE"]),
    Route("/admin/v1/keys", list_keys, methods=["GET"]),
    Route("/admin/v1/keys", create_key, methods=["POST"]),
    Route("/admin/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/admin/v1/replicas", list_replicas, methods=["GET"]),
]
