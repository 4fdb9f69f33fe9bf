"""POST /v1/chat/completions and /v1/completions: authenticate, validate, route, proxy."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from skyfleet.api.body import read_json_object, validate
from skyfleet.api.deps import authenticate, gateway, new_request_id, requires
from skyfleet.api.openai.schema import ChatCompletionRequest, CompletionRequest
from skyfleet.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from skyfleet.gateway.context import RequestContext
from skyfleet.gateway.relay import StreamRelay
from skyfleet.iam.authz import Permission, require_model


async def _handle(request: Request, route: str, path: str, schema: type[ChatCompletionRequest | CompletionRequest]):
    gw = gateway(request)
    principal = await authenticate(request)
    payload = await read_json_object(request, gw.settings.max_body_bytes)
    body = validate(schema, payload)
    require_model(principal, body.model)
    models = gw.registry.models()
    if body.model not in models:
        raise ModelNotFoundError(body.model, [m for m in models if principal.may_use(m)])
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, list) and body.prompt \
            and isinstance(body.prompt[0], str) and len(body.prompt) > 1:
        raise InvalidRequestError("Only one prompt per request is supported.", param="prompt")
    window = gw.registry.context_window(body.model)
    budget = body.output_budget()
    if window is not None and budget is not None and budget >= window:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ContextLengthExceededError(
            f"This model's maximum context length is {window} tokens; {param}={budget} leaves no room "
            "for the prompt. Lower it.", param=param)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # A session id gives stateless clients affinity: their turns return to the replica that
    # holds their KV cache. It only steers routing; the tenant still comes from the key.
    session = request.headers.get("x-session-id") or body.user
    if session is not None and len(session) > 256:
        raise InvalidRequestError("X-Session-Id must be at most 256 characters.", param="X-Session-Id")
    # Last check before the engine: a request refused above consumes no rate limit.
    admission = await gw.limits.admit(principal, payload, request.headers.get("content-length"), budget)
    try:  # budgets: reserve the worst-case cost (429 budget_exceeded gives the rate-limit charge back)
        reservation = await gw.budgets.admit_payload(principal, body.model, payload, budget, window)
    except BaseException:
        gw.limits.cancel(admission)
        raise
    ctx = RequestContext(
        request_id=new_request_id(request), principal=principal, route=route, model=body.model, stream=body.stream,
        include_usage=include_usage, started=gw.clock.now(), started_wall=gw.clock.wall(), session_key=session,
        admission=admission, reservation=reservation,
    )
    try:
        if body.stream:
            return StreamRelay(await gw.proxy.open_stream(ctx, path, payload))
        reply = await gw.proxy.unary(ctx, path, payload)
    except BaseException:
        gw.budgets.cancel(reservation)  # a no-op once the proxy's record has settled it
        raise
    headers = {"x-request-id": ctx.request_id}
    if admission is not None:
        headers.update(admission.headers)
    return Response(reply.body, media_type="application/json", headers=headers)


@requires(Permission.INFERENCE)
async def chat_completions(request: Request):
    return await _handle(request, "chat", "/v1/chat/completions", ChatCompletionRequest)


@requires(Permission.INFERENCE)
async def completions(request: Request):
    return await _handle(request, "completions", "/v1/completions", CompletionRequest)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
