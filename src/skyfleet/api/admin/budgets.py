"""/admin/v1/budgets: create, list (with the current period's spend), change and delete budgets.

Permission ``keys:manage`` (tenant-admin and platform-admin), then object-level rules:

* a platform-admin manages any tenant's and any key's budgets;
* a tenant-admin manages the budgets of its own tenant's keys (up to its own role), reads its own
  tenant's budgets, and never creates, changes or deletes its tenant's own budget (that would be
  a tenant raising its own spending cap: mass assignment, 403);
* another tenant's budget or key is 'not found' (404): no oracle for ids.

Every change applies to this gateway's next request at once (its budget cache is invalidated)
and is recorded in the audit log (ids and amounts, never a key).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.admin.budget_schema import CreateBudget, UpdateBudget, budget_json
from skyfleet.api.admin.schema import changes
from skyfleet.api.body import read_json_object, validate
from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.cost.budget_store_sql import BudgetRepository
from skyfleet.cost.budgets import BudgetDef, BudgetUnavailableError
from skyfleet.errors import InvalidRequestError, NotFoundError, PermissionDeniedError, ServiceUnavailableError
from skyfleet.iam.authz import Permission, may_grant
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway

log = logging.getLogger("skyfleet.admin")
_KNOWN_QUERY = {"tenant"}


def _repo(gw: Gateway) -> BudgetRepository:
    return gw.budgets.definitions or BudgetRepository(gw.store.engine)


async def _render(gw: Gateway, budgets: list[BudgetDef]) -> list[dict[str, Any]]:
    try:
        status = await gw.budgets.status(budgets)
    except BudgetUnavailableError:
        raise ServiceUnavailableError("The budget counters are unreachable; try again shortly.",
                                      code="budget_unavailable") from None
    names = await _repo(gw).names([b.tenant_id for b in budgets])
    return [budget_json(status[b.id], names.get(b.tenant_id)) for b in budgets]


async def _owned(gw: Gateway, who: Principal, budget_id: str) -> BudgetDef:
    """The budget, if this caller may change it (see the module docstring)."""
    budget = await _repo(gw).get(budget_id)
    if who.is_platform_admin:
        return budget
    if budget.tenant_id != who.tenant_id:
        raise NotFoundError(f"budget '{budget_id[:64]}' not found", param="budget_id")
    if budget.key_id is None:
        raise PermissionDeniedError("A tenant-admin cannot change its own tenant's budget; ask a platform-admin.")
    owner = await _repo(gw).key_owner(budget.key_id)
    if owner is not None and not may_grant(who, owner[1]):
        raise PermissionDeniedError(f"A {who.role} key cannot change the budget of a {owner[1]} key.")
    return budget


@requires(Permission.KEYS_MANAGE)
async def list_budgets(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    unknown = sorted(set(request.query_params) - _KNOWN_QUERY)
    if unknown:
        raise InvalidRequestError(f"Unrecognized query parameter: {unknown[0][:64]}", param=unknown[0][:64])
    tenant = request.query_params.get("tenant")
    repo = _repo(gw)
    if who.is_platform_admin:
        tenant_id = None
        if tenant is not None:
            found = await repo.tenant_by_name(tenant)
            if found is None:
                raise NotFoundError(f"tenant '{tenant[:63]}' not found", param="tenant")
            tenant_id = found[0]
    elif tenant is not None and tenant != who.tenant_name:
        raise PermissionDeniedError("This key can only list its own tenant's budgets.", param="tenant")
    else:
        tenant_id = who.tenant_id
    budgets = await repo.list(tenant_id=tenant_id)
    return JSONResponse({"object": "list", "data": await _render(gw, budgets)})


@requires(Permission.KEYS_MANAGE)
async def create_budget(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    body = validate(CreateBudget, await read_json_object(request, gw.settings.max_body_bytes))
    repo = _repo(gw)
    if body.key_id is not None:
        owner = await repo.key_owner(body.key_id)
        if owner is None or (not who.is_platform_admin and owner[0] != who.tenant_id):
            raise NotFoundError(f"API key '{body.key_id[:32]}' not found", param="key_id")
        tenant_id, role = owner
        if not who.is_platform_admin and not may_grant(who, role):
            raise PermissionDeniedError(f"A {who.role} key cannot set the budget of a {role} key.", param="key_id")
        if body.tenant is not None:
            named = await repo.tenant_by_name(body.tenant)
            if named is None or named[0] != tenant_id:
                raise InvalidRequestError("'tenant' must be the key's own tenant (or left out).", param="tenant")
    elif body.tenant is None:
        raise InvalidRequestError("Give 'tenant' (a tenant budget) or 'key_id' (a key budget).", param="tenant")
    elif not who.is_platform_admin:
        # A tenant setting its own spending cap is mass assignment: only a platform-admin may.
        raise PermissionDeniedError("A tenant-admin can set budgets of its tenant's keys, not of the tenant "
                                    "itself; ask a platform-admin.", param="tenant")
    else:
        named = await repo.tenant_by_name(body.tenant)
        if named is None:
            raise NotFoundError(f"tenant '{body.tenant[:63]}' not found", param="tenant")
        tenant_id = named[0]
    budget = await repo.create(tenant_id=tenant_id, key_id=body.key_id, period=body.period,
                               soft_limit_usd_micros=body.soft_limit_usd, hard_limit_usd_micros=body.hard_limit_usd)
    gw.budgets.invalidate(tenant_id)
    gw.audit.record("budget.create", actor=who, tenant_id=tenant_id, target=budget.id, key_id=budget.key_id,
                    period=budget.period, soft_limit_usd_micros=budget.soft_limit_usd_micros,
                    hard_limit_usd_micros=budget.hard_limit_usd_micros)
    log.info("budget created", extra={"budget_id": budget.id, "tenant_id": tenant_id, "by_key_id": who.key_id})
    return JSONResponse((await _render(gw, [budget]))[0], status_code=201)


@requires(Permission.KEYS_MANAGE)
async def update_budget(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    body = validate(UpdateBudget, await read_json_object(request, gw.settings.max_body_bytes))
    current = await _owned(gw, who, request.path_params["budget_id"])
    changed = {f"{name}_micros": value for name, value in changes(body).items()}
    budget = await _repo(gw).update(current.id, changed) if changed else current
    gw.budgets.invalidate(budget.tenant_id)
    gw.audit.record("budget.update", actor=who, tenant_id=budget.tenant_id, target=budget.id,
                    fields=",".join(sorted(changed)), soft_limit_usd_micros=budget.soft_limit_usd_micros,
                    hard_limit_usd_micros=budget.hard_limit_usd_micros)
    return JSONResponse((await _render(gw, [budget]))[0])


@requires(Permission.KEYS_MANAGE)
async def delete_budget(request: Request) -> JSONResponse:
    who = await authenticate(request)
    gw = gateway(request)
    current = await _owned(gw, who, request.path_params["budget_id"])
    budget = await _repo(gw).delete(current.id)
    if gw.budgets.backend is not None:
        try:
            await gw.budgets.backend.forget(budget)
        except BudgetUnavailableError:
            log.warning("deleted budget's counters not dropped (they expire)", extra={"budget_id": budget.id})
    gw.budgets.invalidate(budget.tenant_id)
    gw.audit.record("budget.delete", actor=who, tenant_id=budget.tenant_id, target=budget.id)
    return JSONResponse({"object": "budget.deleted", "id": budget.id, "deleted": True})


routes = [
    Route("/admin/v1/budgets", list_budgets, methods=["GET"]),
    Route("/admin/v1/budgets", create_budget, methods=["POST"]),
    Route("/admin/v1/budgets/{budget_id}", update_budget, methods=["PATCH"]),
    Route("/admin/v1/budgets/{budget_id}", delete_budget, methods=["DELETE"]),
]
