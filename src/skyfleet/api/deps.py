"""What every handler needs first: the gateway, the caller, a request id; and the route permissions.

Every endpoint is declared with :func:`requires` (its :class:`~skyfleet.iam.authz.Permission`), or
:func:`public`. The wrapper authenticates and authorises before the handler runs (so a refused
request never reaches body parsing), and keeps the Principal in the ASGI scope, where the
handler's own ``await authenticate(request)`` finds it without a second lookup.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from skyfleet.errors import AuthenticationError, PermissionDeniedError, ShuttingDownError
from skyfleet.iam.authz import ROLE_PERMISSIONS, Permission, declare
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway

_PRINCIPAL = "skyfleet.principal"
H = TypeVar("H", bound=Callable[[Request], Awaitable[Any]])


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


class RequestIds:
    """Request ids: a random per-process prefix and a counter (unique, cheap, no syscall per request)."""

    def __init__(self) -> None:
        self._prefix = "req_" + secrets.token_hex(6)
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():010x}"


def new_request_id(request: Request) -> str:
    ids: RequestIds = request.app.state.request_ids
    return ids()


def _route(request: Request) -> str:
    """The route template (e.g. ``/v1/conversations/{cid}``), never ids from the URL."""
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.scope.get("path", "")
    return f"{request.method} {str(path)[:200]}"


async def authenticate(request: Request) -> Principal:
    """The caller; every failure is one opaque 401 (recorded as ``auth.failure``, without token material)."""
    principal: Principal | None = request.scope.get(_PRINCIPAL)
    if principal is not None:
        return principal
    gw = gateway(request)
    if not gw.accepting:
        raise ShuttingDownError("the gateway is shutting down; retry on another instance", retry_after_s=1)
    client = request.scope.get("client")
    headers = request.headers
    try:
        principal = await gw.auth.authenticate(
            headers.get("authorization"), peer=client[0] if client else None,
            forwarded_for=headers.get("x-forwarded-for"),
        )
    except AuthenticationError:
        gw.metrics.auth_failures.inc()
        gw.audit.record("auth.failure", actor=None, outcome="denied", target=_route(request))
        raise
    gw.audit.key_used(principal)
    request.scope[_PRINCIPAL] = principal
    return principal


async def authorize(request: Request, permission: Permission) -> Principal:
    """The caller, if its role holds ``permission``; else 403 (recorded as ``authz.denied``)."""
    principal = await authenticate(request)
    if permission not in ROLE_PERMISSIONS.get(principal.role, ()):
        gateway(request).audit.record("authz.denied", actor=principal, tenant_id=principal.tenant_id,
                                      target=_route(request), outcome="denied", permission=permission.value)
        raise PermissionDeniedError(f"This route needs the '{permission.value}' permission, which role "
                                    f"'{principal.role}' does not have.")
    return principal


def requires(permission: Permission) -> Callable[[H], H]:
    """Declare (and enforce) the permission an endpoint needs: ``@requires(Permission.INFERENCE)``."""
    if permission is Permission.PUBLIC:
        return public

    def wrap(handler: H) -> H:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Any:
            await authorize(request, permission)
            return await handler(request)

        declare(endpoint, permission)
        return endpoint  # type: ignore[return-value]

    return wrap


def public(handler: H) -> H:
    """Declare an endpoint that takes no credential (health, metrics, the OpenAPI document)."""
    declare(handler, Permission.PUBLIC)
    return handler
