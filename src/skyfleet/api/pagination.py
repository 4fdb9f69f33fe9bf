"""OpenAI-style list parameters: ``after`` (an id cursor), ``limit`` (1..100), ``order``."""

from __future__ import annotations

from typing import Literal

from starlette.requests import Request

from skyfleet.errors import InvalidRequestError


def page_params(request: Request, *, default_order: Literal["asc", "desc"]) -> tuple[str | None, int,
                                                                                      Literal["asc", "desc"]]:
    q = request.query_params
    after = q.get("after") or None
    if after is not None and len(after) > 128:
        raise InvalidRequestError("'after' is not a valid cursor.", param="after")
    raw_limit = q.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequestError("'limit' must be an integer from 1 to 100.", param="limit")
    order = q.get("order", default_order)
    if order not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be 'asc' or 'desc'.", param="order")
    return after, int(raw_limit), order  # type: ignore[return-value]
