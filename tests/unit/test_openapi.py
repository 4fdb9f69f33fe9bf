"""The OpenAPI document covers every route of the real app, and its bodies are the validation models."""

from __future__ import annotations

from skyfleet.api.openapi import OPERATIONS, build_openapi, route_operations


def _app_routes():
    from skyfleet.api.app import build_app
    from skyfleet.runtime import Gateway

    # The router does not need a running gateway: build the app around an empty one.
    return build_app(Gateway.__new__(Gateway), manage_lifecycle=False).app.routes


def test_every_route_has_an_operation_and_every_operation_a_route() -> None:
    served = set(route_operations(_app_routes()))
    documented = set(OPERATIONS)
    assert served - documented == set(), "routes without an OpenAPI entry"
    assert documented - served == set(), "OpenAPI entries for routes that do not exist"


def test_document_is_valid_openapi_with_validation_models() -> None:
    doc = build_openapi(_app_routes(), version="test")
    assert doc["openapi"] == "3.1.0"
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "messages" in schema["required"] and "model" in schema["required"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/v1/models"]["get"]
    # Every $ref resolves.
    import json
    import re

    for name in re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)):
        assert name in doc["components"]["schemas"], name
