"""Bad input gets a clear OpenAI-shaped 4xx, never a 500, and the server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.harness import MODEL, Gateway

CHAT = "/v1/chat/completions"


def _ok_body(**over: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **over}


@pytest.fixture
def h(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30,
                      headers={"Authorization": f"Bearer {gateway.member_key}"}) as client:
        yield client


def _assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"model": "x", "messages": [}', "invalid_json"),
        (b'{"model": "\xff\xfe"}', "invalid_json"),  # invalid UTF-8
        (b"[1, 2, 3]", None),  # JSON, but not an object
    ],
)
def test_malformed_bodies(h: httpx.Client, raw: bytes, code: str | None) -> None:
    _assert_error(h.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400, code)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (_ok_body(max_tokens="5"), "max_tokens"),
        (_ok_body(max_tokens=0), "max_tokens"),
        (_ok_body(max_tokens=True), "max_tokens"),
        (_ok_body(temperature=7), "temperature"),
        (_ok_body(stream="yes"), "stream"),
        (_ok_body(messages=[]), "messages"),
        (_ok_body(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
        (_ok_body(messages="hello"), "messages"),
        (_ok_body(n=3), "n"),
        (_ok_body(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    ],
)
def test_invalid_fields(h: httpx.Client, body: dict[str, Any], param: str) -> None:
    _assert_error(h.post(CHAT, json=body), 400, param=param)


def test_unknown_model(h: httpx.Client) -> None:
    r = h.post(CHAT, json=_ok_body(model="gpt-17"))
    _assert_error(r, 404, "model_not_found", "model")
    assert MODEL in r.json()["error"]["message"]


def test_unknown_route_and_method(h: httpx.Client) -> None:
    _assert_error(h.get("/v1/nothing-here"), 404, "unknown_url")
    _assert_error(h.get(CHAT), 405, "method_not_allowed")


def test_max_tokens_beyond_context_window(h: httpx.Client) -> None:
    _assert_error(h.post(CHAT, json=_ok_body(max_tokens=100_000)), 400, "context_length_exceeded", "max_tokens")
    r = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5000})
    _assert_error(r, 400, "context_length_exceeded")


def test_prompt_beyond_context_window(h: httpx.Client) -> None:
    long = "hello " * 3000  # about 3,000 tokens; each slot has 2,048
    r = h.post(CHAT, json=_ok_body(messages=[{"role": "user", "content": long}]))
    _assert_error(r, 400, "context_length_exceeded")


def test_body_over_limit(h: httpx.Client) -> None:
    big = b'{"model": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    _assert_error(h.post(CHAT, content=big, headers={"content-type": "application/json"}), 413, "payload_too_large")


def test_body_over_limit_chunked(h: httpx.Client) -> None:
    def gen() -> Iterator[bytes]:
        for _ in range(5):
            yield b" " * (1024 * 1024)

    _assert_error(h.post(CHAT, content=gen(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize(
    "auth",
    [None, "", "Bearer", "Basic abc", "Bearer sk-sf-nope", "Bearer " + "sk-sf-" + "A" * 43,
     "Bearer ' OR 1=1 --", "Bearer " + "x" * 10_000],
)
def test_bad_credentials(gateway: Gateway, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    with httpx.Client(base_url=gateway.url, timeout=30) as h:
        r = h.post(CHAT, json=_ok_body(), headers=headers)
    _assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_member_key_cannot_use_admin_api(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as h:
        r = h.get("/admin/v1/tenants", headers={"Authorization": f"Bearer {gateway.member_key}"})
    _assert_error(r, 403, "permission_denied")


def test_server_still_healthy_after_bad_input(gateway: Gateway, h: httpx.Client) -> None:
    for raw in (b"{", b"\x00\x01", b"null", b'{"model": 1}'):
        assert h.post(CHAT, content=raw).status_code == 400
    assert h.get("/healthz").status_code == 200
    r = h.post(CHAT, json=_ok_body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    # Nothing above was a server error.
    assert gateway.metric("skyfleet_requests_total", status="failed", code="server_error") == 0
