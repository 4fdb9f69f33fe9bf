"""GET /v1/models and /v1/models/{model}: only the models the credential may use."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.deps import authenticate, gateway, requires
from skyfleet.api.openai.schema import model_object
from skyfleet.errors import ModelNotFoundError
from skyfleet.iam.authz import Permission


@requires(Permission.MODELS_READ)
async def list_models(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    gw = gateway(request)
    created = int(request.app.state.started_wall)
    data = [model_object(m, created) for m in gw.registry.models() if principal.may_use(m)]
    return JSONResponse({"object": "list", "data": data})


@requires(Permission.MODELS_READ)
async def get_model(request: Request) -> JSONResponse:
    principal = await authenticate(request)
    gw = gateway(request)
    model = request.path_params["model"]
    models = [m for m in gw.registry.models() if principal.may_use(m)]
    if model not in models:  # a model the key may not use does not exist for it
        raise ModelNotFoundError(model, models)
    return JSONResponse(model_object(model, int(request.app.state.started_wall)))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
