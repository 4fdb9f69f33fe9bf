"""/v1/conversations: create, retrieve, update metadata, delete; items: list, add, retrieve, delete."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.body import read_json_object
from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.api.items import check_metadata, item_json, list_json, normalise_items
from skyfleet.api.pagination import page_params
from skyfleet.errors import InvalidRequestError
from skyfleet.iam.authz import Permission
from skyfleet.state.conversations import ConversationRecord


def conversation_json(c: ConversationRecord) -> dict[str, Any]:
    return {"id": c.id, "object": "conversation", "created_at": int(c.created_at.timestamp()),
            "metadata": c.metadata}


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidRequestError(f"Unrecognized request argument supplied: {extra[0]}", param=extra[0])


@requires(Permission.STORED_WRITE)
async def create_conversation(request: Request) -> JSONResponse:
    gw = gateway(request)
    principal = await authenticate(request)
    body = await read_json_object(request, gw.settings.max_body_bytes)
    _only(body, {"items", "metadata"})
    items = normalise_items(body["items"], "items") if body.get("items") is not None else []
    conv = await gw.store.conversations.create(principal.tenant_id, metadata=check_metadata(body.get("metadata")),
                                               items=items)
    return JSONResponse(conversation_json(conv))


@requires(Permission.STORED_READ)
async def get_conversation(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    conv = await gateway(request).store.conversations.get(principal.tenant_id, request.path_params["cid"])
    return JSONResponse(conversation_json(conv))


@requires(Permission.STORED_WRITE)
async def update_conversation(request: Request) -> JSONResponse:
    gw = gateway(request)
    principal = await authenticate(request)
    body = await read_json_object(request, gw.settings.max_body_bytes)
    _only(body, {"metadata"})
    if "metadata" not in body:
        raise InvalidRequestError("'metadata' is required.", param="metadata")
    conv = await gw.store.conversations.update_metadata(principal.tenant_id, request.path_params["cid"],
                                                        check_metadata(body["metadata"]))
    return JSONResponse(conversation_json(conv))


@requires(Permission.STORED_WRITE)
async def delete_conversation(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    cid = request.path_params["cid"]
    await gateway(request).store.conversations.delete(principal.tenant_id, cid)
    gateway(request).audit.record("conversation.delete", actor=principal, tenant_id=principal.tenant_id,
                                  target=cid)
    return JSONResponse({"id": cid, "object": "conversation.deleted", "deleted": True})


@requires(Permission.STORED_READ)
async def list_items(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    after, limit, order = page_params(request, default_order="desc")
    items, has_more = await gateway(request).store.conversations.list_items(
        principal.tenant_id, request.path_params["cid"], after=after, limit=limit, order=order)
    return JSONResponse(list_json([item_json(r.item, r.id) for r in items], has_more))


@requires(Permission.STORED_WRITE)
async def add_items(request: Request) -> JSONResponse:
    gw = gateway(request)
    principal = await authenticate(request)
    body = await read_json_object(request, gw.settings.max_body_bytes)
    _only(body, {"items"})
    items = normalise_items(body.get("items"), "items")
    added = await gw.store.conversations.add_items(principal.tenant_id, request.path_params["cid"], items)
    return JSONResponse(list_json([item_json(r.item, r.id) for r in added], False))


@requires(Permission.STORED_READ)
async def get_item(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    p = request.path_params
    rec = await gateway(request).store.conversations.get_item(principal.tenant_id, p["cid"], p["item_id"])
    return JSONResponse(item_json(rec.item, rec.id))


@requires(Permission.STORED_WRITE)
async def delete_item(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    p = request.path_params
    store = gateway(request).store.conversations
    await store.delete_item(principal.tenant_id, p["cid"], p["item_id"])
    gateway(request).audit.record("conversation.item.delete", actor=principal, tenant_id=principal.tenant_id,
                                  target=p["cid"], item_id=p["item_id"])
    return JSONResponse(conversation_json(await store.get(principal.tenant_id, p["cid"])))


routes = [
    Route("/v1/conversations", create_conversation, methods=["POST"]),
    Route("/v1/conversations/{cid}", get_conversation, methods=["GET"]),
    Route("/v1/conversations/{cid}", update_conversation, methods=["POST"]),
    Route("/v1/conversations/{cid}", delete_conversation, methods=["DELETE"]),
    Route("/v1/conversations/{cid}/items", list_items, methods=["GET"]),
    Route("/v1/conversations/{cid}/items", add_items, methods=["POST"]),
    Route("/v1/conversations/{cid}/items/{item_id}", get_item, methods=["GET"]),
    Route("/v1/conversations/{cid}/items/{item_id}", delete_item, methods=["DELETE"]),
]
