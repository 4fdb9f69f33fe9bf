"""Hostile input: injection and oversized values in the credential and in every id, huge headers.

Each must get a clear 4xx (401 for credentials, 404 for ids), never a 500, and fast.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.security.conftest import World

HOSTILE = [
    "' OR '1'='1", "1; DROP TABLE tenants; --", "conv_' UNION SELECT key_hash FROM api_keys --",
    "%00", "..%2F..%2Fetc%2Fpasswd", "\u202e\u0000", "\U0001f600" * 50, "A" * 10_000, "conv_" + "9" * 5000,
    "${jndi:ldap://x}", "<script>alert(1)</script>", "-1", "0x7fffffff",
]
AUTH_HOSTILE = [
    "Bearer ' OR '1'='1", "Bearer sk-sf-' OR 1=1 --", "Bearer sk-sf-" + "'" * 43, "Bearer " + "A" * 100_000,
    "Bearer sk-sf-" + "A" * 10_000, "bearer  sk-sf-", "Bearer \tx", "Bearer eyJhbGciOiJub25lIn0.e30.",
    "Bearer a.b.c", "Bearer " + "eyJ" + "A" * 5000 + ".e30.x",
]


def _paths(world: World) -> list[tuple[str, str]]:
    with world.gw.http() as h:
        doc = h.get("/openapi.json").json()
    return [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops if "{" in p]


@pytest.mark.parametrize("auth", AUTH_HOSTILE)
def test_hostile_credentials_get_a_fast_opaque_401(world: World, auth: str) -> None:
    with world.gw.http() as h:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/admin/v1/tenants")):
            start = time.monotonic()
            r = h.request(method, path, headers={"Authorization": auth}, json={})
            if len(auth) > 32 * 1024:  # past the request-head bound: refused before authentication
                assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_too_large"
            else:
                assert r.status_code == 401, (path, r.status_code, r.text[:200])
                assert r.json()["error"]["code"] == "invalid_api_key"
            assert time.monotonic() - start < 1.0


def test_hostile_ids_on_every_route_are_404_never_500(world: World) -> None:
    key = world.tenants[0].key
    paths = _paths(world)
    assert len(paths) >= 10  # the document really lists the id-taking routes
    seen = set()
    with world.gw.http() as h:
        for method, template in paths:
            for value in HOSTILE:
                path = template
                for name in ("cid", "item_id", "response_id", "model", "name", "key_id"):
                    path = path.replace("{" + name + "}", quote(value, safe=""))
                admin = template.startswith("/admin/")
                headers = {"Authorization": f"Bearer {world.gw.admin_key if admin else key}"}
                start = time.monotonic()
                r = h.request(method, path, headers=headers, json={} if method in ("POST", "PATCH") else None)
                elapsed = time.monotonic() - start
                assert r.status_code < 500, (method, template, value[:40], r.status_code, r.text[:200])
                assert r.status_code in (400, 404, 414), (method, template, value[:40], r.status_code, r.text[:200])
                assert r.headers["content-type"].startswith("application/json")
                assert "error" in r.json()
                assert elapsed < 1.0, (method, template, elapsed)
                seen.add(r.status_code)
    assert 404 in seen
    # The store survived: tenants and their data are all still there.
    with world.gw.http() as h:
        names = {t["name"] for t in h.get("/admin/v1/tenants",
                                          headers={"Authorization": f"Bearer {world.gw.admin_key}"}).json()["data"]}
    assert {t.name for t in world.tenants} <= names


def test_long_url_is_refused(world: World) -> None:
    with world.gw.http() as h:
        r = h.get("/v1/conversations/" + "c" * 40_000, headers={"Authorization": f"Bearer {world.tenants[0].key}"})
    assert r.status_code == 414 and r.json()["error"]["code"] == "request_header_too_large"


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
def test_huge_header_is_refused_and_the_gateway_lives_on(world: World, size: int) -> None:
    # Sent on a raw socket: HTTP clients refuse to build such requests themselves.
    url = urlsplit(world.gw.url)
    request = (f"GET /v1/models HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {world.tenants[0].key}\r\n"
               f"X-Junk: {'J' * size}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        try:
            s.sendall(request)
            status_line = s.recv(4096).split(b"\r\n", 1)[0]
        except (ConnectionResetError, BrokenPipeError):
            status_line = b"reset"
    assert not status_line.startswith(b"HTTP/1.1 5"), status_line
    # 431 as soon as the bound (32 KiB) is passed; the client may see a reset if it is still sending.
    assert status_line == b"reset" or status_line.startswith(b"HTTP/1.1 431"), status_line
    with httpx.Client(base_url=world.gw.url) as h:
        assert h.get("/v1/models", headers={"Authorization": f"Bearer {world.tenants[0].key}"}).status_code == 200
