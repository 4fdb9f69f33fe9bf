"""/v1/responses: create (streaming or not), retrieve, delete, input items."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.body import read_json_object, validate
from skyfleet.api.deps import authenticate, gateway, new_request_id, requires
from skyfleet.api.items import item_json, list_json
from skyfleet.api.pagination import page_params
from skyfleet.api.responses.schema import CreateResponse
from skyfleet.api.responses.service import ResponsesService
from skyfleet.api.responses.stream import ResponseEventStream
from skyfleet.iam.authz import Permission, require_model


@requires(Permission.INFERENCE)
async def create_response(request: Request):
    gw = gateway(request)
    principal = await authenticate(request)
    payload = await read_json_object(request, gw.settings.max_body_bytes)
    body = validate(CreateResponse, payload)
    require_model(principal, body.model)
    service = ResponsesService(gw)
    # Before the turn touches the store: a refused request costs no database work. The history's
    # tokens are not in the estimate; the actual usage is reconciled when the turn ends.
    admission = await gw.limits.admit(principal, payload, request.headers.get("content-length"),
                                      body.max_output_tokens)
    try:
        turn = await service.start_turn(principal, body)
    except BaseException:
        gw.limits.cancel(admission)
        raise
    ctx = service.context(principal, turn, new_request_id(request))
    ctx.admission = admission
    if body.stream:
        return ResponseEventStream(service, ctx, turn, await service.open_stream(ctx, turn))
    headers = {"x-request-id": ctx.request_id}
    if admission is not None:
        headers.update(admission.headers)
    return JSONResponse(await service.generate(ctx, turn), headers=headers)


@requires(Permission.STORED_READ)
async def get_response(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    rec = await gateway(request).store.responses.get(principal.tenant_id, request.path_params["response_id"])
    return JSONResponse(rec.body)


@requires(Permission.STORED_WRITE)
async def delete_response(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    response_id = request.path_params["response_id"]
    await gateway(request).store.responses.delete(principal.tenant_id, response_id)
    gateway(request).audit.record("response.delete", actor=principal, tenant_id=principal.tenant_id,
                                  target=response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@requires(Permission.STORED_READ)
async def list_input_items(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    after, limit, order = page_params(request, default_order="desc")
    items, has_more = await gateway(request).store.responses.input_items(
        principal.tenant_id, request.path_params["response_id"], after=after, limit=limit, order=order)
    return JSONResponse(list_json([item_json(r.item, r.id) for r in items], has_more))


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
]
