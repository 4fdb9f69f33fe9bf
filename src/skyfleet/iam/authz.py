"""Authorisation: roles are sets of permissions; every route declares the one permission it needs.

Pure data and functions, no I/O. A request is allowed when its route's permission is in the
caller's role's set (one frozenset lookup); object-level rules (a tenant-admin acts only on its
own tenant, and never grants more than it holds) are the ``may_*`` functions below, applied by the
handlers. The route x role matrix is derived from the app's router (:func:`route_rules`), so it
cannot drift from what is enforced; ``skyfleet authz matrix`` prints it (docs/security.md).

Roles, from least to most privileged:

* ``read-only``: list models; read its tenant's stored conversations, items and responses.
* ``member``: read-only + inference (chat, completions, responses) and writing stored state.
* ``tenant-admin``: member + its own tenant's keys (roles up to tenant-admin) and reading its tenant.
* ``platform-admin``: everything, across tenants: tenants, their limits, replicas, the audit log.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from skyfleet.errors import PermissionDeniedError
from skyfleet.iam.principal import PLATFORM_ADMIN, Principal

TENANT_ADMIN = "tenant-admin"
MEMBER = "member"
READ_ONLY = "read-only"
#: Every role, most privileged first (the order of :data:`ROLE_RANK`).
ROLES = (PLATFORM_ADMIN, TENANT_ADMIN, MEMBER, READ_ONLY)
ROLE_RANK = {READ_ONLY: 0, MEMBER: 1, TENANT_ADMIN: 2, PLATFORM_ADMIN: 3}


class Permission(StrEnum):
    """What a route needs. ``PUBLIC`` routes take no credential at all."""

    PUBLIC = "public"
    #: GET /v1/models (only the models the credential may use are listed).
    MODELS_READ = "models:read"
    #: Read the tenant's stored conversations, items and responses.
    STORED_READ = "stored:read"
    #: Generate: chat, completions, responses create.
    INFERENCE = "inference"
    #: Create, change and delete the tenant's stored conversations, items and responses.
    STORED_WRITE = "stored:write"
    #: Create, list, change and revoke keys (its own tenant's, unless platform-admin).
    KEYS_MANAGE = "keys:manage"
    #: Read a tenant (its own, unless platform-admin).
    TENANT_READ = "tenant:read"
    #: List, create, change (limits, retention, prefix sharing) and delete tenants.
    TENANTS_ADMIN = "tenants:admin"
    #: The fleet: replicas and their state.
    FLEET_READ = "fleet:read"
    #: The fleet controller's manual operations: pin a pool's size, simulate a preemption.
    FLEET_MANAGE = "fleet:manage"
    #: The audit log.
    AUDIT_READ = "audit:read"


_READ_ONLY = frozenset({Permission.MODELS_READ, Permission.STORED_READ})
_MEMBER = _READ_ONLY | {Permission.INFERENCE, Permission.STORED_WRITE}
_TENANT_ADMIN = _MEMBER | {Permission.KEYS_MANAGE, Permission.TENANT_READ}
_PLATFORM_ADMIN = frozenset(Permission) - {Permission.PUBLIC}

#: role -> the permissions it holds.
ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    PLATFORM_ADMIN: _PLATFORM_ADMIN,
    TENANT_ADMIN: _TENANT_ADMIN,
    MEMBER: _MEMBER,
    READ_ONLY: _READ_ONLY,
}

#: The attribute :func:`declare` sets on an endpoint.
PERMISSION_ATTR = "skyfleet_permission"


def allowed(role: str, permission: Permission) -> bool:
    """Whether ``role`` may call a route that needs ``permission`` (an unknown role may call nothing)."""
    return permission is Permission.PUBLIC or permission in ROLE_PERMISSIONS.get(role, ())


def declare(endpoint: Any, permission: Permission) -> None:
    setattr(endpoint, PERMISSION_ATTR, permission)


def declared(endpoint: Any) -> Permission | None:
    value = getattr(endpoint, PERMISSION_ATTR, None)
    return value if isinstance(value, Permission) else None


# -- object-level rules ------------------------------------------------------------------------


def may_grant(principal: Principal, role: str) -> bool:
    """A credential can give (create or patch a key to) a role no higher than its own."""
    return principal.is_platform_admin or ROLE_RANK.get(role, 99) <= ROLE_RANK.get(principal.role, -1)


def may_act_on_tenant(principal: Principal, tenant_name: str | None) -> bool:
    """Tenant-scoped admin actions: a platform-admin on any tenant, anyone else on its own only."""
    return principal.is_platform_admin or tenant_name == principal.tenant_name


def may_grant_models(principal: Principal, models: Iterable[str] | None) -> bool:
    """A credential restricted to some models cannot give a key more models than it has itself."""
    if principal.is_platform_admin or principal.models is None:
        return True
    return models is not None and set(models) <= principal.models


# -- the route x role matrix ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRule:
    method: str
    path: str
    #: None: the route declares nothing (a bug: :func:`undeclared` lists them and a test fails).
    permission: Permission | None


def _walk(routes: Iterable[Any], prefix: str = "") -> Iterator[RouteRule]:
    for route in routes:
        children = getattr(route, "routes", None)
        path = prefix + str(getattr(route, "path", "?"))
        if children is not None and getattr(route, "endpoint", None) is None:
            yield from _walk(children, path)  # a Mount
            continue
        methods = getattr(route, "methods", None) or {"*"}
        permission = declared(getattr(route, "endpoint", None))
        for method in sorted(methods):
            if method != "HEAD":  # implied by GET
                yield RouteRule(method, path, permission)


def route_rules(*route_lists: Iterable[Any]) -> list[RouteRule]:
    """Every (method, path) of the given route lists with its declared permission, deduplicated.

    Takes Starlette routes (``path``, ``methods``, ``endpoint``; a Mount's ``routes`` are walked),
    e.g. the app's router and the FastPath table. A path served twice with different permissions
    is reported as undeclared (None), so it fails the completeness test.
    """
    found: dict[tuple[str, str], Permission | None] = {}
    for routes in route_lists:
        for rule in _walk(routes):
            key = (rule.method, rule.path)
            if key in found and found[key] != rule.permission:
                found[key] = None
            else:
                found.setdefault(key, rule.permission)
    return [RouteRule(m, p, perm) for (m, p), perm in found.items()]


@dataclass(frozen=True, slots=True)
class _FastRoute:
    path: str
    methods: frozenset[str]
    endpoint: Any


def app_route_rules(app: Any) -> list[RouteRule]:
    """The rules of a built gateway app: its Starlette router and the FastPath table in front of it."""
    fast = [_FastRoute(path, frozenset({method}), endpoint)
            for (method, path), endpoint in getattr(app, "fast_routes", {}).items()]
    return route_rules(getattr(app, "app", app).routes, fast)


def undeclared(rules: Iterable[RouteRule]) -> list[str]:
    return [f"{r.method} {r.path}" for r in rules if r.permission is None]


def matrix(rules: Iterable[RouteRule]) -> dict[tuple[str, str, str], bool]:
    """(method, path, role) -> allowed. A route without a declared permission is allowed to no one."""
    return {(r.method, r.path, role): r.permission is not None and allowed(role, r.permission)
            for r in rules for role in ROLES}


def matrix_markdown(rules: Iterable[RouteRule]) -> str:
    """The matrix as a Markdown table (public routes marked as such)."""
    ordered = sorted(rules, key=lambda r: (r.path, r.method))
    lines = ["| method | path | permission | " + " | ".join(ROLES) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ROLES) + " |"]
    for r in ordered:
        perm = r.permission.value if r.permission is not None else "UNDECLARED"
        cells = [("public" if r.permission is Permission.PUBLIC else
                  "yes" if r.permission is not None and allowed(role, r.permission) else "no") for role in ROLES]
        lines.append(f"| {r.method} | `{r.path}` | `{perm}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def roles_markdown() -> str:
    """Which permissions each role holds, as a Markdown table."""
    lines = ["| permission | " + " | ".join(ROLES) + " |", "| --- | " + " | ".join("---" for _ in ROLES) + " |"]
    for perm in Permission:
        if perm is Permission.PUBLIC:
            continue
        lines.append(f"| `{perm.value}` | " + " | ".join("yes" if perm in ROLE_PERMISSIONS[r] else "no"
                                                        for r in ROLES) + " |")
    return "\n".join(lines) + "\n"


def require_model(principal: Principal, model: str) -> None:
    """403 unless the credential's model allow-list admits ``model``."""
    if not principal.may_use(model):
        raise PermissionDeniedError(f"This key may not use the model '{str(model)[:200]}'.", param="model")
