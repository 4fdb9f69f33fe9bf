"""The gateway's OpenAPI 3.1 document, built from the live router (served at ``GET /openapi.json``).

Paths and methods come from the app's routes, so a route cannot be missing from the document;
what each operation accepts comes from :data:`OPERATIONS` (a test fails for a route without an
entry). Request bodies are the same pydantic models the handlers validate with, so the document
and the validation cannot drift apart. Used for client generation and for the schemathesis run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.routing import BaseRoute, Route

from skyfleet.api.admin import schema as admin_schema
from skyfleet.api.admin.budget_schema import CreateBudget, UpdateBudget
from skyfleet.api.admin.fleet import PreemptReplica, ScaleFleet
from skyfleet.api.openai.schema import ChatCompletionRequest, CompletionRequest
from skyfleet.api.responses.schema import CreateResponse

_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")

#: Shapes accepted by the hand-validated Conversations routes (see api/items.py).
_ITEM = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "type": {"const": "message"},
        "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"enum": ["input_text", "output_text", "text"]}, "text": {"type": "string"}},
            }},
        ]},
    },
}
_METADATA = {"type": ["object", "null"], "maxProperties": 16,
             "additionalProperties": {"type": "string", "maxLength": 512}, "propertyNames": {"maxLength": 64}}
_CREATE_CONVERSATION = {"type": "object", "additionalProperties": False, "properties": {
    "items": {"type": ["array", "null"], "maxItems": 1000, "items": _ITEM}, "metadata": _METADATA}}
_UPDATE_CONVERSATION = {"type": "object", "additionalProperties": False, "required": ["metadata"],
                        "properties": {"metadata": _METADATA}}
_ADD_ITEMS = {"type": "object", "additionalProperties": False, "required": ["items"],
              "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 1000, "items": _ITEM}}}

_PAGE = [
    {"name": "after", "in": "query", "schema": {"type": "string", "maxLength": 128}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
]
_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: type[BaseModel] | dict[str, Any] | None = None
    query: list[dict[str, Any]] = field(default_factory=list)
    public: bool = False
    content_type: str = "application/json"


def _admin(name: str) -> type[BaseModel] | None:
    model = getattr(admin_schema, name, None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


#: (method, path) -> what the operation accepts. Every route of the app must have an entry.
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/chat/completions"): Operation("Create a chat completion", "inference", ChatCompletionRequest),
    ("POST", "/v1/completions"): Operation("Create a completion", "inference", CompletionRequest),
    ("GET", "/v1/models"): Operation("List the models this key may use", "inference"),
    ("GET", "/v1/models/{model}"): Operation("Retrieve a model", "inference"),
    ("POST", "/v1/responses"): Operation("Create a response", "responses", CreateResponse),
    ("GET", "/v1/responses/{response_id}"): Operation("Retrieve a stored response", "responses"),
    ("DELETE", "/v1/responses/{response_id}"): Operation("Delete a stored response", "responses"),
    ("GET", "/v1/responses/{response_id}/input_items"): Operation("List a response's input items",
                                                                   "responses", query=_PAGE),
    ("POST", "/v1/conversations"): Operation("Create a conversation", "conversations", _CREATE_CONVERSATION),
    ("GET", "/v1/conversations/{cid}"): Operation("Retrieve a conversation", "conversations"),
    ("POST", "/v1/conversations/{cid}"): Operation("Update a conversation's metadata", "conversations",
                                                   _UPDATE_CONVERSATION),
    ("DELETE", "/v1/conversations/{cid}"): Operation("Delete a conversation", "conversations"),
    ("GET", "/v1/conversations/{cid}/items"): Operation("List a conversation's items", "conversations",
                                                        query=_PAGE),
    ("POST", "/v1/conversations/{cid}/items"): Operation("Add items to a conversation", "conversations",
                                                         _ADD_ITEMS),
    ("GET", "/v1/conversations/{cid}/items/{item_id}"): Operation("Retrieve an item", "conversations"),
    ("DELETE", "/v1/conversations/{cid}/items/{item_id}"): Operation("Delete an item", "conversations"),
    ("GET", "/healthz"): Operation("Liveness", "operations", public=True, content_type="application/json"),
    ("GET", "/readyz"): Operation("Readiness: every model has a replica in routing", "operations", public=True),
    ("GET", "/metrics"): Operation("Prometheus metrics (needs fleet:read: labels name tenants)", "operations",
                                   content_type="text/plain"),
    ("GET", "/openapi.json"): Operation("This document", "operations", public=True),
    ("GET", "/admin/v1/tenants"): Operation("List tenants", "admin"),
    ("POST", "/admin/v1/tenants"): Operation("Create a tenant", "admin", _admin("CreateTenant")),
    ("GET", "/admin/v1/tenants/{name}"): Operation("Retrieve a tenant", "admin"),
    ("PATCH", "/admin/v1/tenants/{name}"): Operation("Change a tenant's limits and settings", "admin",
                                                     _admin("UpdateTenant")),
    ("DELETE", "/admin/v1/tenants/{name}"): Operation("Delete a tenant and shred its data key", "admin"),
    ("GET", "/admin/v1/keys"): Operation("List API keys", "admin",
                                         query=[{"name": "tenant", "in": "query", "schema": {"type": "string"}}]),
    ("POST", "/admin/v1/keys"): Operation("Create an API key", "admin", _admin("CreateKey")),
    ("PATCH", "/admin/v1/keys/{key_id}"): Operation("Change a key's role, models, networks or limits", "admin",
                                                    _admin("UpdateKey")),
    ("DELETE", "/admin/v1/keys/{key_id}"): Operation("Revoke an API key", "admin"),
    ("GET", "/admin/v1/replicas"): Operation("List replicas", "admin"),
    ("GET", "/admin/v1/budgets"): Operation("List budgets with the current period's spend", "admin",
                                            query=[{"name": "tenant", "in": "query", "schema": {"type": "string"}}]),
    ("POST", "/admin/v1/budgets"): Operation("Create a budget for a tenant or an API key", "admin", CreateBudget),
    ("PATCH", "/admin/v1/budgets/{budget_id}"): Operation("Change a budget's soft or hard limit", "admin",
                                                          UpdateBudget),
    ("DELETE", "/admin/v1/budgets/{budget_id}"): Operation("Delete a budget", "admin"),
    ("GET", "/admin/v1/audit"): Operation("List audit log entries", "admin", query=[
        {"name": "tenant", "in": "query", "schema": {"type": "string"}},
        {"name": "action", "in": "query", "schema": {"type": "string"}},
        {"name": "since", "in": "query", "schema": {"type": "string"}},
        {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}]),
    ("GET", "/admin/v1/usage"): Operation("List usage records (token counts and charges, never text)", "admin",
                                          query=[
        {"name": "since", "in": "query", "schema": {"type": "string"}},
        {"name": "until", "in": "query", "schema": {"type": "string"}},
        {"name": "tenant", "in": "query", "schema": {"type": "string"}},
        {"name": "model", "in": "query", "schema": {"type": "string", "maxLength": 200}},
        {"name": "key", "in": "query", "schema": {"type": "string", "maxLength": 80}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
        {"name": "after", "in": "query", "schema": {"type": "string", "maxLength": 64}}]),
    ("GET", "/admin/v1/costs"): Operation("Cost report: charged, attributed and idle cost over a window", "admin",
                                          query=[
        {"name": "by", "in": "query",
         "schema": {"enum": ["tenant", "model", "key", "pool", "instance-type"]}},
        {"name": "since", "in": "query", "schema": {"type": "string"}},
        {"name": "until", "in": "query", "schema": {"type": "string"}},
        {"name": "tenant", "in": "query", "schema": {"type": "string"}}]),
    ("GET", "/admin/v1/fleet"): Operation("Fleet status: pools, replicas, tier, $/hour, load, cold starts", "admin"),
    ("GET", "/admin/v1/fleet/history"): Operation("Fleet controller decisions with their inputs", "admin", query=[
        {"name": "model", "in": "query", "schema": {"type": "string", "maxLength": 200}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
        {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}}]),
    ("POST", "/admin/v1/fleet/scale"): Operation("Pin a pool to a number of replicas (null: release it)", "admin",
                                                 ScaleFleet),
    ("POST", "/admin/v1/fleet/preempt"): Operation("Simulate a spot preemption of a local replica", "admin",
                                                   PreemptReplica),
}


def route_operations(routes: list[BaseRoute]) -> list[tuple[str, str]]:
    """Every (method, OpenAPI path) the router serves; HEAD (implied by GET) is left out."""
    found = []
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = _PARAM.sub(r"{\1}", route.path)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, path))
    return found


def _body_schema(body: type[BaseModel] | dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    schema = body.model_json_schema(ref_template=_REF, mode="validation")
    components.update(schema.pop("$defs", {}))
    components[body.__name__] = schema
    return {"$ref": _REF.format(model=body.__name__)}


def _operation(method: str, path: str, op: Operation, components: dict[str, Any]) -> dict[str, Any]:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
              for name in _PARAM.findall(path)]
    out: dict[str, Any] = {
        "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": params + op.query,
        "responses": {"200": {"description": "OK", "content": {op.content_type: {"schema": {}}}}},
    }
    if op.public:
        out["security"] = []
    else:
        for status, why in (("400", "Invalid request"), ("401", "Missing, unknown, revoked or expired credential"),
                            ("403", "The credential's role or allow-list does not permit this"),
                            ("404", "Not found (or another tenant's)"), ("429", "Rate limit exceeded")):
            out["responses"][status] = {"description": why, "content": {"application/json": {
                "schema": {"$ref": _REF.format(model="Error")}}}}
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": _body_schema(op.body, components)}}}
    return out


def build_openapi(routes: list[BaseRoute], *, version: str) -> dict[str, Any]:
    """The OpenAPI document for ``routes``; KeyError names a route without an :data:`OPERATIONS` entry."""
    components: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in route_operations(routes):
        op = OPERATIONS.get((method, path))
        if op is None:
            raise KeyError(f"no OpenAPI entry for {method} {path}")
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "skyfleet gateway", "version": version,
                 "description": "OpenAI-compatible inference, Responses and Conversations APIs, and the "
                                "skyfleet admin API. Authenticate with `Authorization: Bearer <key or JWT>`."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
