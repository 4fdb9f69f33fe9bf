"""GET /admin/v1/audit: the audit log, newest first.

A platform-admin reads every entry (or one tenant's, with ``?tenant=NAME``); a tenant-admin reads
only its own tenant's entries. Query: ``tenant``, ``action`` (exact, or a prefix such as
``key.*``), ``since`` (ISO 8601, or an age: ``30m``, ``12h``, ``7d``), ``before`` (a seq: the next
page), ``limit`` (1..1000, default 100). Entries carry ids and scalars only, never a key or text.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.audit.chain import SealedEntry
from skyfleet.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from skyfleet.iam.authz import Permission
from skyfleet.state.audit import LIST_LIMIT_MAX, AuditQuery, AuditRepository, parse_since
from skyfleet.state.repositories import TENANT_NAME_PATTERN

_KNOWN = {"tenant", "action", "since", "before", "limit"}
_ACTION_RE = re.compile(r"[a-z0-9_.-]{1,64}(\.\*)?", re.ASCII)


def _int(raw: str | None, name: str, default: int | None, low: int, high: int) -> int | None:
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequestError(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return int(raw)


# TENANT_READ: what a tenant-admin holds for its own tenant; reading across tenants is checked below.
@requires(Permission.TENANT_READ)
async def list_audit(request: Request) -> JSONResponse:
    who = await authenticate(request)
    q = request.query_params
    unknown = sorted(set(q) - _KNOWN)
    if unknown:
        raise InvalidRequestError(f"Unrecognized query parameter: {unknown[0][:64]}", param=unknown[0][:64])
    repo = AuditRepository(gateway(request).store.engine)
    tenant = q.get("tenant")
    if who.is_platform_admin:
        tenant_ids = None
        if tenant is not None:
            tenant_ids = await repo.tenant_ids(tenant) if re.fullmatch(TENANT_NAME_PATTERN, tenant) else ()
        if tenant_ids == ():
            raise NotFoundError(f"tenant '{tenant[:100] if tenant else ''}' not found", param="tenant")
    elif tenant is not None and tenant != who.tenant_name:
        raise PermissionDeniedError("This key can only read its own tenant's audit log.", param="tenant")
    else:
        tenant_ids = (who.tenant_id,)
    action = q.get("action")
    if action is not None and _ACTION_RE.fullmatch(action) is None:
        raise InvalidRequestError("'action' must be an action such as key.revoke, or a prefix such as key.*",
                                  param="action")
    try:
        since = parse_since(q["since"]) if "since" in q else None
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="since") from None
    before = _int(q.get("before"), "before", None, 1, 2**62)
    limit = _int(q.get("limit"), "limit", 100, 1, LIST_LIMIT_MAX) or 100
    entries, more = await repo.list(AuditQuery(tenant_ids=tenant_ids, action=action, since=since,
                                               before_seq=before, limit=limit))
    data = [e.json() if isinstance(e, SealedEntry) else {"seq": e.seq, "unreadable": True} for e in entries]
    return JSONResponse({"object": "list", "data": data, "has_more": more})


routes = [Route("/admin/v1/audit", list_audit, methods=["GET"])]
