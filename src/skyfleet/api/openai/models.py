"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from skyfleet.api.deps import authenticate, gateway
from skyfleet.api.openai.schema import model_object
from skyfleet.errors import ModelNotFoundError


async def list_models(request: Request) -> JSONResponse:
    await authenticate(request)
    gw = gateway(request)
    created = int(request.app.state.started_wall)
    return JSONResponse({"object": "list", "data": [model_object(m, created) for m in gw.registry.models()]})


async def get_model(request: Request) -> JSONResponse:
    await authenticate(request)
    gw = gateway(request)
    model = request.path_params["model"]
    models = gw.registry.models()
    if model not in models:
        raise ModelNotFoundError(model, models)
    return JSONResponse(model_object(model, int(request.app.state.started_wall)))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
