"""GET /admin/v1/usage (usage records, paged) and GET /admin/v1/costs (the cost report).

A platform-admin reads every tenant's usage (or one tenant's, with ``?tenant=NAME``); a tenant-admin
only its own tenant's, and its cost report shows only its own rows (no fleet-wide idle cost or
totals). Usage records carry ids, token counts, timings and money: never a prompt, a completion or
a key.

``/usage``: ``since``, ``until`` (by when a request ended; an age such as ``24h`` or an ISO 8601
time), ``tenant``, ``model``, ``key`` (a key id), ``limit`` (1..1000, default 100), ``after`` (the
last ``request_id`` of the previous page). Newest first.

``/costs``: ``by`` (tenant | model | key | pool | instance-type; default tenant), ``since`` (default
``24h``), ``until``, ``tenant``: the same report as ``skyfleet cost report --format json``.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from skyfleet.iam.authz import Permission
from skyfleet.iam.principal import Principal
from skyfleet.state.cost_queries import USAGE_LIMIT_MAX, CostQueries, UnknownCursorError, UsageQuery
from skyfleet.state.repositories import TENANT_NAME_PATTERN

_USAGE_PARAMS = {"since", "until", "tenant", "model", "key", "limit", "after"}
_COST_PARAMS = {"by", "since", "until", "tenant"}
#: Request ids, key ids and model names as they are stored (printable, no spaces), bounded.
_ID_RE = re.compile(r"[A-Za-z0-9._:/@+-]{1,200}", re.ASCII)


def _known(request: Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise InvalidRequestError(f"Unrecognized query parameter: {unknown[0][:64]}", param=unknown[0][:64])
    for name in allowed:
        if len(request.query_params.getlist(name)) > 1:
            raise InvalidRequestError(f"'{name}' was given more than once.", param=name)


def _id(request: Request, name: str, max_len: int) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if len(raw) > max_len or _ID_RE.fullmatch(raw) is None:
        raise InvalidRequestError(f"'{name}' is not a valid {name}.", param=name)
    return raw


async def _tenant_scope(request: Request, who: Principal, queries: CostQueries) -> tuple[str, ...] | None:
    """The tenant ids the caller may read and asked for; None: every tenant (platform-admin only)."""
    tenant = request.query_params.get("tenant")
    if not who.is_platform_admin:
        if tenant is not None and tenant != who.tenant_name:
            raise PermissionDeniedError("This key can only read its own tenant's usage.", param="tenant")
        return (who.tenant_id,)
    if tenant is None:
        return None
    ids = await queries.tenant_ids(tenant) if re.fullmatch(TENANT_NAME_PATTERN, tenant) else ()
    if not ids:
        raise NotFoundError(f"tenant '{tenant[:100]}' not found", param="tenant")
    return ids


def _window(request: Request, now: datetime, default_since: str | None) -> tuple[datetime | None, datetime | None]:
    from skyfleet.cost.reports import WindowError, parse_time

    q = request.query_params
    try:
        since = parse_time(q["since"], now, name="since") if "since" in q else None
        if since is None and default_since is not None:
            since = parse_time(default_since, now, name="since")
        until = parse_time(q["until"], now, name="until") if "until" in q else None
    except WindowError as exc:
        raise InvalidRequestError(str(exc), param="until" if "'until'" in str(exc) else "since") from None
    if since is not None and until is not None and since >= until:
        raise InvalidRequestError("the window is empty: 'since' must be before 'until'", param="since")
    return since, until


@requires(Permission.TENANT_READ)
async def list_usage(request: Request) -> JSONResponse:
    who = await authenticate(request)
    _known(request, _USAGE_PARAMS)
    queries = CostQueries(gateway(request).store.engine)
    since, until = _window(request, datetime.now(UTC), None)
    raw_limit = request.query_params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= USAGE_LIMIT_MAX:
        raise InvalidRequestError(f"'limit' must be an integer from 1 to {USAGE_LIMIT_MAX}.", param="limit")
    query = UsageQuery(since=since, until=until, tenant_ids=await _tenant_scope(request, who, queries),
                       model=_id(request, "model", 200), key_id=_id(request, "key", 80),
                       after=_id(request, "after", 64), limit=int(raw_limit))
    try:
        rows, more = await queries.usage_page(query)
    except UnknownCursorError:
        raise InvalidRequestError("'after' is not a valid cursor.", param="after") from None
    names = await queries.tenant_names(r.tenant_id for r in rows)
    data = [{"object": "usage_record", **r.json(), "tenant": names.get(r.tenant_id)} for r in rows]
    return JSONResponse({"object": "list", "data": data, "has_more": more,
                         "last_id": rows[-1].request_id if rows else None})


@requires(Permission.TENANT_READ)
async def get_costs(request: Request) -> JSONResponse:
    from skyfleet.cost.pricing import api_prices, token_weights
    from skyfleet.cost.reports import DIMENSIONS, MAX_WINDOW, build_report

    who = await authenticate(request)
    _known(request, _COST_PARAMS)
    by = request.query_params.get("by", "tenant")
    if by not in DIMENSIONS:
        raise InvalidRequestError(f"'by' must be one of {', '.join(DIMENSIONS)}.", param="by")
    gw = gateway(request)
    queries = CostQueries(gw.store.engine)
    now = datetime.now(UTC)
    since, until = _window(request, now, "24h")
    assert since is not None
    end = min(until, now) if until is not None else now
    if since >= end:
        raise InvalidRequestError("'since' must be in the past and before 'until'.", param="since")
    if end - since > MAX_WINDOW:
        raise InvalidRequestError(f"the window is longer than {MAX_WINDOW.days} days.", param="since")
    tenant_ids = await _tenant_scope(request, who, queries)
    window = await queries.window(since, end, now)
    report = await asyncio.to_thread(build_report, window, by=by, weights=token_weights(gw.settings),
                                     token_prices=api_prices(gw.settings), tenant_ids=tenant_ids)
    groups = [r.group for r in report.rows]
    names = (await queries.tenant_names(groups) if by == "tenant" else
             await queries.key_names(groups) if by == "key" else {})
    return JSONResponse(report.named(names).json())

routes = [Route("/admin/v1/usage", list_usage, methods=["GET"]),
          Route("/admin/v1/costs", get_costs, methods=["GET"])]
