"""What every handler needs first: the gateway, the caller, a request id."""

from __future__ import annotations

import secrets

from starlette.requests import Request

from skyfleet.errors import AuthenticationError, PermissionDeniedError, ShuttingDownError
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


async def authenticate(request: Request) -> Principal:
    gw = gateway(request)
    if not gw.accepting:
        raise ShuttingDownError("the gateway is shutting down; retry on another instance", retry_after_s=1)
    try:
        return await gw.auth.authenticate(request.headers.get("authorization"))
    except AuthenticationError:
        gw.metrics.auth_failures.inc()
        raise


async def authenticate_admin(request: Request) -> Principal:
    principal = await authenticate(request)
    if not principal.is_platform_admin:
        raise PermissionDeniedError("This route needs a platform-admin key.")
    return principal
