"""The ASGI application: routes from each surface, errors rendered in the OpenAI shape."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from skyfleet.api import health
from skyfleet.api.admin import audit as admin_audit
from skyfleet.api.admin import budgets as admin_budgets
from skyfleet.api.admin import costs as admin_costs
from skyfleet.api.admin import fleet as admin_fleet
from skyfleet.api.admin import routes as admin
from skyfleet.api.conversations import router as conversations
from skyfleet.api.deps import RequestIds, public
from skyfleet.api.openai import inference, models
from skyfleet.api.openapi import build_openapi
from skyfleet.api.responses import router as responses
from skyfleet.crypto import DecryptionError
from skyfleet.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    RouteNotFoundError,
    SkyfleetError,
    StoredDataUnreadableError,
)
from skyfleet.runtime import Gateway

log = logging.getLogger("skyfleet.api")


def error_response(err: SkyfleetError) -> Response:
    return Response(err.body_bytes(), status_code=err.status, media_type="application/json", headers=err.headers)


async def _skyfleet_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SkyfleetError)
    if exc.status >= 500:
        log.warning("request failed", extra={"path": request.url.path, "code": exc.code, "status": exc.status})
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(RouteNotFoundError(f"Unknown request URL: {request.method} {request.url.path[:200]}."))
    if exc.status_code == 405:
        return error_response(MethodNotAllowedError(f"Method {request.method} is not allowed for this URL."))
    return error_response(InvalidRequestError(str(exc.detail)[:200]))


async def _undecryptable(request: Request, exc: Exception) -> Response:
    log.error("stored record failed to decrypt", extra={"path": request.url.path})
    return error_response(StoredDataUnreadableError())


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Log the type only: exception messages can carry request data.
    log.error("unexpected error", extra={"path": request.url.path, "error_type": type(exc).__name__},
              exc_info=(type(exc), exc, None))
    return error_response(SkyfleetError("The server had an error while processing your request."))


class FastPath:
    """Serve the hot inference routes without Starlette's middleware and routing layers.

    Every token of a stream passes through ``send``; Starlette wraps it twice (error and
    exception middleware), which cost 10-15% of the gateway's CPU on streaming workloads. The
    handlers are the same; errors are rendered exactly as the Starlette app renders them.
    Everything else (other routes, lifespan) goes to the Starlette app.
    """

    def __init__(self, app: Starlette, routes: dict[tuple[str, str], Any]) -> None:
        self.app = app
        self.state = app.state
        self._routes = routes

    @property
    def fast_routes(self) -> dict[tuple[str, str], Any]:
        """(method, path) -> endpoint of the routes served here (for the authorisation matrix)."""
        return self._routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        handler = self._routes.get((scope.get("method"), scope.get("path"))) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except SkyfleetError as exc:
            response = await _skyfleet_error(request, exc)
        except Exception as exc:  # noqa: BLE001 - rendered as the OpenAI-shaped 500, like the app does
            response = await _unexpected(request, exc)
        await response(scope, receive, send)


@public
async def openapi_json(request: Request) -> JSONResponse:
    """GET /openapi.json: the document for this app's routes (built once)."""
    doc = getattr(request.app.state, "openapi", None)
    if doc is None:
        doc = request.app.state.openapi = build_openapi(request.app.routes, version=importlib.metadata.version("skyfleet"))
    return JSONResponse(doc)


def build_app(gw: Gateway, *, manage_lifecycle: bool = True) -> FastPath:
    """The gateway's ASGI app. With ``manage_lifecycle`` the app starts and stops ``gw`` itself."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_lifecycle:
            await gw.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await gw.stop()

    app = Starlette(
        routes=[*inference.routes, *models.routes, *responses.routes, *conversations.routes, *health.routes,
                *admin.routes, *admin_audit.routes, *admin_budgets.routes, *admin_costs.routes, *admin_fleet.routes,
                Route("/openapi.json", openapi_json, methods=["GET"])],
        exception_handlers={SkyfleetError: _skyfleet_error, HTTPException: _http_error,
                            DecryptionError: _undecryptable, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.gateway = gw
    app.state.request_ids = RequestIds()
    app.state.started_wall = time.time()
    return FastPath(app, {("POST", route.path): route.endpoint for route in inference.routes})
