"""What every handler needs first: the gateway, the caller, a request id."""

from __future__ import annotations

import itertools
import secrets

from starlette.requests import Request

from skyfleet.errors import AuthenticationError, PermissionDeniedError, ShuttingDownError
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway


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
