"""/admin/v1/*: tenants, keys and replicas.

Tenants (list, create, change, delete) and replicas need a platform-admin; a tenant-admin manages
its own tenant's keys (never above its own role, never more models than it has) and reads its own
tenant. Every change is recorded in the audit log (by key id, never the key).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.admin.schema import (
    CreateKey,
    CreateTenant,
    UpdateKey,
    UpdateTenant,
    changes,
    key_json,
    tenant_json,
)
from skyfleet.api.body import read_json_object, validate
from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.errors import NotFoundError, PermissionDeniedError
from skyfleet.iam.authz import ROLE_RANK, Permission, may_act_on_tenant, may_grant, may_grant_models
from skyfleet.iam.principal import Principal
from skyfleet.state.repositories import KeyRecord

log = logging.getLogger("skyfleet.admin")


@requires(Permission.TENANTS_ADMIN)
async def list_tenants(request: Request) -> JSONResponse:
    tenants = await gateway(request).store.tenants.list()
    return JSONResponse({"object": "list", "data": [tenant_json(t) for t in tenants]})


@requires(Permission.TENANTS_ADMIN)
async def create_tenant(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    body = validate(CreateTenant, await read_json_object(request, gw.settings.max_body_bytes))
    tenant = await gw.store.tenants.create(body.name)
    gw.audit.record("tenant.create", actor=who, tenant_id=tenant.id, target=tenant.id)
    log.info("tenant created", extra={"tenant_id": tenant.id, "by_key_id": who.key_id})
    return JSONResponse(tenant_json(tenant), status_code=201)


@requires(Permission.TENANT_READ)
async def get_tenant(request: Request) -> JSONResponse:
    who = await authenticate(request)
    name = request.path_params["name"]
    if not may_act_on_tenant(who, name):
        raise PermissionDeniedError("This key can only read its own tenant.")
    return JSONResponse(tenant_json(await gateway(request).store.tenants.get(name)))


@requires(Permission.TENANTS_ADMIN)
async def update_tenant(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    body = validate(UpdateTenant, await read_json_object(request, gw.settings.max_body_bytes))
    changed = changes(body)
    tenant = await gw.store.tenants.update(request.path_params["name"], changed)
    gw.auth.evict_tenant(tenant.id)  # its limits reach this gateway's cached credentials at once
    gw.audit.record("tenant.update", actor=who, tenant_id=tenant.id, target=tenant.id,
                    fields=",".join(sorted(changed)))
    return JSONResponse(tenant_json(tenant))


@requires(Permission.TENANTS_ADMIN)
async def delete_tenant(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    name = request.path_params["name"]
    tenant = await gw.store.tenants.get(name)
    await gw.store.tenants.delete(name)
    await gw.store.keyring.shred(tenant.id)  # crypto-shredding: its stored data can never be decrypted again
    gw.auth.evict_tenant(tenant.id)
    slot_files = await gw.kv.forget_tenant(tenant.id)  # its saved KV slots (sealed, so unreadable already)
    gw.audit.record("tenant.delete", actor=who, tenant_id=tenant.id, target=tenant.id, shredded=True,
                    slot_files_deleted=slot_files)
    log.info("tenant deleted and shredded", extra={"tenant_id": tenant.id, "by_key_id": who.key_id})
    return JSONResponse({"object": "tenant.deleted", "id": tenant.id, "name": name, "deleted": True})


@requires(Permission.KEYS_MANAGE)
async def list_keys(request: Request) -> JSONResponse:
    who = await authenticate(request)
    tenant = request.query_params.get("tenant")
    if not who.is_platform_admin:
        if tenant is not None and tenant != who.tenant_name:
            raise PermissionDeniedError("This key can only list its own tenant's keys.")
        tenant = who.tenant_name
    keys = await gateway(request).store.keys.list(tenant)
    return JSONResponse({"object": "list", "data": [key_json(k) for k in keys]})


def _check_grant(who: Principal, role: str | None, models: list[str] | None, models_given: bool) -> None:
    if role is not None and not may_grant(who, role):
        raise PermissionDeniedError(f"A {who.role} key cannot give the role '{role}'.", param="role")
    if models_given and not may_grant_models(who, models):
        raise PermissionDeniedError("A key cannot give more models than it may use itself.", param="models")


@requires(Permission.KEYS_MANAGE)
async def create_key(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    body = validate(CreateKey, await read_json_object(request, gw.settings.max_body_bytes))
    if not may_act_on_tenant(who, body.tenant):
        raise PermissionDeniedError("This key can only create keys for its own tenant.", param="tenant")
    _check_grant(who, body.role, body.models, True)
    plaintext, record = await gw.store.keys.create(
        body.tenant, role=body.role, name=body.name, expires_at=body.expires_at, models=body.models,
        cidrs=body.cidrs, rpm_limit=body.rpm_limit, tpm_limit=body.tpm_limit,
    )
    gw.audit.record("key.create", actor=who, tenant_id=record.tenant_id, target=record.id, role=record.role)
    log.info("key created", extra={"key_id": record.id, "tenant_id": record.tenant_id, "by_key_id": who.key_id})
    return JSONResponse({**key_json(record), "key": plaintext}, status_code=201)


async def _own_key(request: Request, who: Principal) -> tuple[str | None, list[str] | None]:
    """The guards for acting on a key: a non-platform caller only on its tenant's keys, up to its role.

    Another tenant's key is 'not found' (no oracle for key ids); a key above the caller's role, 403.
    """
    if who.is_platform_admin:
        return None, None
    key_id = request.path_params["key_id"]
    record: KeyRecord = await gateway(request).store.keys.get(key_id)
    if record.tenant_id != who.tenant_id:
        raise NotFoundError(f"API key '{key_id[:100]}' not found", param="key_id")
    if not may_grant(who, record.role):
        raise PermissionDeniedError(f"A {who.role} key cannot change a {record.role} key.")
    return who.tenant_id, [r for r, rank in ROLE_RANK.items() if rank <= ROLE_RANK.get(who.role, -1)]


@requires(Permission.KEYS_MANAGE)
async def update_key(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    body = validate(UpdateKey, await read_json_object(request, gw.settings.max_body_bytes))
    changed = changes(body)
    _check_grant(who, changed.get("role"), changed.get("models"), "models" in changed)
    tenant_id, roles = await _own_key(request, who)
    record = await gw.store.keys.update(request.path_params["key_id"], changed, tenant_id=tenant_id, roles=roles)
    gw.auth.evict_key(record.id)
    gw.audit.record("key.update", actor=who, tenant_id=record.tenant_id, target=record.id,
                    fields=",".join(sorted(changed)))
    return JSONResponse(key_json(record))


@requires(Permission.KEYS_MANAGE)
async def revoke_key(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    tenant_id, roles = await _own_key(request, who)
    record = await gw.store.keys.revoke(request.path_params["key_id"], tenant_id=tenant_id, roles=roles)
    gw.auth.evict_key(record.id)
    gw.audit.record("key.revoke", actor=who, tenant_id=record.tenant_id, target=record.id)
    log.info("key revoked", extra={"key_id": record.id, "by_key_id": who.key_id})
    return JSONResponse(key_json(record))


@requires(Permission.FLEET_READ)
async def list_replicas(request: Request) -> JSONResponse:
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
    Route("/admin/v1/tenants/{name}", update_tenant, methods=["PATCH"]),
    Route("/admin/v1/tenants/{name}", delete_tenant, methods=["DELETE"]),
    Route("/admin/v1/keys", list_keys, methods=["GET"]),
    Route("/admin/v1/keys", create_key, methods=["POST"]),
    Route("/admin/v1/keys/{key_id}", update_key, methods=["PATCH"]),
    Route("/admin/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/admin/v1/replicas", list_replicas, methods=["GET"]),
]
