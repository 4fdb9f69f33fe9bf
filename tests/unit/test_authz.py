"""Authorisation: the route x role matrix of the real app, mass-assignment guards, model allow-lists, audit."""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.routing import Route

from skyfleet.api.app import build_app
from skyfleet.cli.authz import matrix_section, replace_section
from skyfleet.iam.authz import (
    ROLE_PERMISSIONS,
    ROLE_RANK,
    ROLES,
    Permission,
    RouteRule,
    allowed,
    app_route_rules,
    matrix,
    may_grant,
    may_grant_models,
    route_rules,
    undeclared,
)
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway
from tests.unit.iam_app import App, bearer, in_process_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    async with in_process_app(tmp_path_factory.mktemp("authz")) as built:
        yield built


def _principal(role: str, models: frozenset[str] | None = None, tenant: str = "acme") -> Principal:
    return Principal(tenant_id="ten_" + tenant, tenant_name=tenant, role=role, key_id="key_x", models=models)


# -- pure rules -----------------------------------------------------------------------------------


def test_roles_are_nested_and_only_platform_admin_crosses_tenants() -> None:
    ordered = sorted(ROLES, key=ROLE_RANK.__getitem__)
    for lower, higher in itertools.pairwise(ordered):
        assert ROLE_PERMISSIONS[lower] < ROLE_PERMISSIONS[higher]
    assert ROLE_PERMISSIONS["platform-admin"] == frozenset(Permission) - {Permission.PUBLIC}
    for perm in (Permission.TENANTS_ADMIN, Permission.FLEET_READ, Permission.AUDIT_READ):
        assert [r for r in ROLES if perm in ROLE_PERMISSIONS[r]] == ["platform-admin"]
    assert not allowed("emperor", Permission.MODELS_READ) and allowed("emperor", Permission.PUBLIC)


@given(st.sampled_from(ROLES), st.sampled_from(ROLES))
def test_a_key_grants_no_role_above_its_own(holder: str, wanted: str) -> None:
    assert may_grant(_principal(holder), wanted) == (holder == "platform-admin" or
                                                     ROLE_RANK[wanted] <= ROLE_RANK[holder])


@given(st.frozensets(st.sampled_from("abcd")) | st.none(), st.lists(st.sampled_from("abcde")) | st.none())
def test_a_key_grants_no_model_outside_its_own_allow_list(own: frozenset[str] | None, wanted: list[str] | None) -> None:
    ok = may_grant_models(_principal("tenant-admin", own), wanted)
    assert ok == (own is None or (wanted is not None and set(wanted) <= own))
    assert may_grant_models(_principal("platform-admin", own), wanted)


def test_undeclared_and_conflicting_routes_are_reported() -> None:
    async def bare(request):  # pragma: no cover - never called
        raise AssertionError

    gw_app = build_app(Gateway.__new__(Gateway), manage_lifecycle=False)
    gw_app.app.router.routes.append(Route("/v1/new-thing", bare, methods=["GET", "POST"]))
    assert undeclared(app_route_rules(gw_app)) == ["GET /v1/new-thing", "POST /v1/new-thing"]
    first = Route("/x", bare, methods=["GET"])
    rules = route_rules([first], [type("R", (), {"path": "/x", "methods": {"GET"}, "endpoint": build_app})()])
    assert rules == [RouteRule("GET", "/x", None)]


def test_security_doc_matrix_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    assert matrix_section() in doc, "run: skyfleet authz matrix --write docs/security.md"
    assert replace_section(doc, matrix_section()) == doc


def test_replace_section_keeps_the_rest() -> None:
    doc = "# Security\n\nintro\n\n## Authorisation matrix\n\nold\n\n## Keys\n\nkeep\n"
    assert replace_section(doc, "## Authorisation matrix\n\nnew\n") == \
        "# Security\n\nintro\n\n## Authorisation matrix\n\nnew\n\n## Keys\n\nkeep\n"
    assert replace_section("# S\n", "## Authorisation matrix\n") == "# S\n\n## Authorisation matrix\n"


# -- the matrix, enforced by the real app -------------------------------------------------------

_PARAMS = {"cid": "conv_x", "item_id": "msg_x", "response_id": "resp_x", "key_id": "key_doesnotexist",
           "model": "some-model", "budget_id": "bud_doesnotexist"}


def _concrete(method: str, path: str) -> str:
    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "name":  # own tenant, except where the call would destroy it
            return "no-such-tenant" if method == "DELETE" else "acme"
        return _PARAMS[name]

    return re.sub(r"{(\w+)(?::\w+)?}", fill, path)


async def test_every_route_declares_a_permission(app: App) -> None:
    rules = app_route_rules(app.asgi)
    assert undeclared(rules) == [], "every route must declare requires(Permission.X) or public"
    # The FastPath inference routes are among them, with the same (declared) endpoints.
    assert set(app.asgi.fast_routes) <= {(r.method, r.path) for r in rules}
    assert {r.path for r in rules} >= {"/v1/chat/completions", "/admin/v1/keys/{key_id}", "/healthz"}


async def test_every_route_with_every_role_is_allowed_or_403_exactly_as_the_matrix_says(app: App) -> None:
    rules = app_route_rules(app.asgi)
    expected = matrix(rules)
    checked = 0
    async with app.http() as h:
        for rule in rules:
            url = _concrete(rule.method, rule.path)
            body = {} if rule.method in ("POST", "PATCH") else None
            anonymous = await h.request(rule.method, url, json=body)
            if rule.permission is Permission.PUBLIC:
                assert anonymous.status_code not in (401, 403), (rule, anonymous.text)
                continue
            assert anonymous.status_code == 401, (rule, anonymous.text)
            for role in ROLES:
                r = await h.request(rule.method, url, json=body, headers=bearer(app.keys[role]))
                if expected[(rule.method, rule.path, role)]:
                    assert r.status_code not in (401, 403), (rule, role, r.status_code, r.text)
                else:
                    assert r.status_code == 403, (rule, role, r.status_code, r.text)
                    assert r.json()["error"]["code"] == "permission_denied"
                checked += 1
    assert checked >= 4 * 25


# -- mass assignment ----------------------------------------------------------------------------

_ADMIN_CALLS = [
    ("GET", "/admin/v1/tenants", None), ("POST", "/admin/v1/tenants", {"name": "evil"}),
    ("GET", "/admin/v1/tenants/acme", None), ("PATCH", "/admin/v1/tenants/acme", {"rpm_limit": 5}),
    ("DELETE", "/admin/v1/tenants/acme", None), ("GET", "/admin/v1/keys", None),
    ("POST", "/admin/v1/keys", {"tenant": "acme", "role": "member"}),
    ("PATCH", "/admin/v1/keys/{member}", {"role": "platform-admin"}), ("DELETE", "/admin/v1/keys/{member}", None),
    ("GET", "/admin/v1/replicas", None),
]


@pytest.mark.parametrize("role", ["member", "read-only"])
async def test_member_and_read_only_keys_get_403_on_every_admin_route(app: App, role: str) -> None:
    async with app.http() as h:
        for method, path, body in _ADMIN_CALLS:
            r = await h.request(method, path.format(member=app.key_ids["member"]), json=body,
                                headers=bearer(app.keys[role]))
            assert r.status_code == 403, (method, path, r.text)
    assert (await app.gw.store.tenants.get("acme")).rpm_limit is None


async def test_tenant_admin_cannot_escalate(app: App) -> None:
    ta = bearer(app.keys["tenant-admin"])
    async with app.http() as h:
        for body in ({"tenant": "acme", "role": "platform-admin"}, {"tenant": "globex", "role": "member"}):
            r = await h.post("/admin/v1/keys", json=body, headers=ta)
            assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
        member_id = app.key_ids["member"]
        r = await h.patch(f"/admin/v1/keys/{member_id}", json={"role": "platform-admin"}, headers=ta)
        assert r.status_code == 403
        r = await h.patch("/admin/v1/tenants/acme", json={"rpm_limit": 1_000_000}, headers=ta)
        assert r.status_code == 403
        # Another tenant's key is not found (no oracle), a platform-admin key of its own tenant is off limits.
        r = await h.patch(f"/admin/v1/keys/{app.key_ids['globex-member']}", json={"rpm_limit": 1}, headers=ta)
        assert r.status_code == 404
        assert (await h.delete(f"/admin/v1/keys/{app.key_ids['globex-member']}", headers=ta)).status_code == 404
        for call in (h.patch(f"/admin/v1/keys/{app.key_ids['platform-admin']}", json={"models": ["x"]}, headers=ta),
                     h.delete(f"/admin/v1/keys/{app.key_ids['platform-admin']}", headers=ta)):
            assert (await call).status_code == 403
        assert (await h.get("/admin/v1/keys", params={"tenant": "globex"}, headers=ta)).status_code == 403
        assert (await h.get("/admin/v1/tenants/globex", headers=ta)).status_code == 403
    for key in ("member", "platform-admin", "globex-member"):
        rec = await app.gw.store.keys.get(app.key_ids[key])
        assert rec.revoked_at is None and rec.models is None and rec.rpm_limit is None
    assert (await app.gw.store.keys.get(member_id)).role == "member"
    assert (await app.gw.store.tenants.get("acme")).rpm_limit is None


async def test_tenant_admin_manages_its_own_tenants_keys(app: App) -> None:
    ta = bearer(app.keys["tenant-admin"])
    async with app.http() as h:
        r = await h.post("/admin/v1/keys", json={"tenant": "acme", "role": "tenant-admin", "models": ["m1"],
                                                 "cidrs": ["10.1.2.3/8"], "rpm_limit": 10}, headers=ta)
        assert r.status_code == 201, r.text
        made = r.json()
        assert (made["models"], made["cidrs"], made["rpm_limit"]) == (["m1"], ["10.0.0.0/8"], 10)
        listed = (await h.get("/admin/v1/keys", headers=ta)).json()["data"]
        assert {k["tenant"] for k in listed} == {"acme"} and made["id"] in {k["id"] for k in listed}
        r = await h.patch(f"/admin/v1/keys/{made['id']}", json={"models": None, "tpm_limit": 500, "role": "member"},
                          headers=ta)
        assert r.status_code == 200, r.text
        assert (r.json()["models"], r.json()["tpm_limit"], r.json()["role"]) == (None, 500, "member")
        assert (await h.get("/admin/v1/tenants/acme", headers=ta)).json()["name"] == "acme"
        r = await h.delete(f"/admin/v1/keys/{made['id']}", headers=ta)
        assert r.status_code == 200 and r.json()["revoked_at"] is not None


async def test_restricted_tenant_admin_cannot_widen_models(app: App) -> None:
    _, rec = await app.gw.store.keys.create("acme", role="tenant-admin", models=["m1", "m2"])
    key, _ = await app.gw.store.keys.create("acme", role="tenant-admin", models=["m1"])
    async with app.http() as h:
        for models in (None, ["m1", "m2"]):
            r = await h.post("/admin/v1/keys", json={"tenant": "acme", "models": models}, headers=bearer(key))
            assert r.status_code == 403, r.text
        r = await h.patch(f"/admin/v1/keys/{rec.id}", json={"models": None}, headers=bearer(key))
        assert r.status_code == 403
        r = await h.post("/admin/v1/keys", json={"tenant": "acme", "models": ["m1"]}, headers=bearer(key))
        assert r.status_code == 201


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("POST", "/admin/v1/tenants", {"name": "x1", "id": "ten_evil"}, "id"),
    ("POST", "/admin/v1/keys", {"tenant": "acme", "key_hash": "0" * 64}, "key_hash"),
    ("POST", "/admin/v1/keys", {"tenant": "acme", "tenant_id": "ten_evil"}, "tenant_id"),
    ("PATCH", "/admin/v1/keys/{member}", {"tenant": "globex"}, "tenant"),
    ("PATCH", "/admin/v1/keys/{member}", {"revoked_at": None}, "revoked_at"),
    ("PATCH", "/admin/v1/tenants/acme", {"name": "renamed"}, "name"),
    ("PATCH", "/admin/v1/tenants/acme", {"deleted_at": None}, "deleted_at"),
])
async def test_unknown_admin_fields_are_400(app: App, method: str, path: str, body: dict, field: str) -> None:
    async with app.http() as h:
        for who in ("platform-admin", "tenant-admin"):
            if who == "tenant-admin" and "tenants" in path and method != "GET":
                continue  # refused earlier, by the route's permission
            r = await h.request(method, path.format(member=app.key_ids["member"]), json=body,
                                headers=bearer(app.keys[who]))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == field


async def test_invalid_restrictions_are_400(app: App) -> None:
    async with app.http() as h:
        pa = bearer(app.keys["platform-admin"])
        for body, param in (({"cidrs": ["not-an-ip"]}, "cidrs"), ({"models": []}, "models"),
                            ({"rpm_limit": 0}, "rpm_limit"), ({"rpm_limit": "5"}, "rpm_limit"),
                            ({"expires_at": "2030-01-01T00:00:00"}, "expires_at")):
            r = await h.post("/admin/v1/keys", json={"tenant": "acme", **body}, headers=pa)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        r = await h.patch("/admin/v1/tenants/acme", json={"share_public_prefix": "yes"}, headers=pa)
        assert r.status_code == 400


# -- model allow-lists, tenant settings through the credential ---------------------------------


@pytest.fixture(scope="module")
async def app_with_models(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    replicas = [{"url": "http://127.0.0.1:9", "model": m, "engine": "llama"} for m in ("m1", "m2")]
    async with in_process_app(tmp_path_factory.mktemp("models"), static_replicas=replicas) as built:
        yield built


async def test_model_allow_list(app_with_models: App) -> None:
    app = app_with_models
    key, _ = await app.gw.store.keys.create("acme", models=["m1"])
    sdk = app.sdk(key)
    assert [m.id for m in (await sdk.models.list()).data] == ["m1"]
    assert [m.id for m in (await app.sdk(app.keys["member"]).models.list()).data] == ["m1", "m2"]
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("m2")
    for call in (sdk.chat.completions.create(model="m2", messages=[{"role": "user", "content": "hi"}]),
                 sdk.completions.create(model="m2", prompt="hi"),
                 sdk.responses.create(model="m2", input="hi")):
        with pytest.raises(openai.PermissionDeniedError) as err:
            await call
        assert err.value.status_code == 403 and err.value.body["code"] == "permission_denied"
    # The allowed model gets past authorisation (there is no live replica behind it here).
    with pytest.raises(openai.APIStatusError) as err:
        await sdk.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code not in (401, 403)


async def test_credential_carries_key_and_tenant_settings(app: App) -> None:
    await app.gw.store.tenants.update("globex", {"rpm_limit": 600, "tpm_limit": 90_000, "share_public_prefix": True})
    key, rec = await app.gw.store.keys.create("globex", models=["m1"], rpm_limit=60, tpm_limit=9000)
    p = await app.gw.auth.authenticate(f"Bearer {key}")
    assert (p.tenant_name, p.key_id, p.models, p.rpm_limit, p.tpm_limit) == ("globex", rec.id, {"m1"}, 60, 9000)
    assert (p.tenant_rpm_limit, p.tenant_tpm_limit, p.share_public_prefix) == (600, 90_000, True)
    # An admin change reaches this gateway's cache at once.
    async with app.http() as h:
        r = await h.patch("/admin/v1/tenants/globex", json={"rpm_limit": None, "share_public_prefix": False},
                          headers=bearer(app.keys["bootstrap"]))
        assert r.status_code == 200 and r.json()["rpm_limit"] is None and r.json()["tpm_limit"] == 90_000
        r = await h.patch(f"/admin/v1/keys/{rec.id}", json={"models": ["m1", "m2"]},
                          headers=bearer(app.keys["bootstrap"]))
        assert r.status_code == 200
    p = await app.gw.auth.authenticate(f"Bearer {key}")
    assert (p.tenant_rpm_limit, p.share_public_prefix, p.models) == (None, False, {"m1", "m2"})


# -- audit ----------------------------------------------------------------------------------------


async def test_admin_actions_and_denials_are_audited_without_secrets(tmp_path: Path) -> None:
    async with in_process_app(tmp_path) as app:
        pa = bearer(app.keys["platform-admin"])
        async with app.http() as h:
            tenant = (await h.post("/admin/v1/tenants", json={"name": "initech"}, headers=pa)).json()
            assert (await h.patch("/admin/v1/tenants/initech", json={"rpm_limit": 5}, headers=pa)).status_code == 200
            made = (await h.post("/admin/v1/keys", json={"tenant": "initech"}, headers=pa)).json()
            assert (await h.patch(f"/admin/v1/keys/{made['id']}", json={"name": "x"}, headers=pa)).status_code == 200
            assert (await h.delete(f"/admin/v1/keys/{made['id']}", headers=pa)).status_code == 200
            assert (await h.delete("/admin/v1/tenants/initech", headers=pa)).status_code == 200
            assert (await h.get("/v1/models", headers=bearer("sk-sf-" + "Z" * 43))).status_code == 401
            assert (await h.get("/admin/v1/keys", headers=bearer(app.keys["member"]))).status_code == 403
        by_action = {e["action"]: e for e in app.audit.entries}
        for action in ("tenant.create", "tenant.update", "tenant.delete"):
            assert by_action[action]["tenant_id"] == tenant["id"] == by_action[action]["target"]
            assert by_action[action]["actor"].key_id == app.key_ids["platform-admin"]
        assert by_action["tenant.delete"]["shredded"] is True
        assert by_action["tenant.update"]["fields"] == "rpm_limit"
        for action in ("key.create", "key.update", "key.revoke"):
            assert by_action[action]["target"] == made["id"] and by_action[action]["tenant_id"] == tenant["id"]
        failure = by_action["auth.failure"]
        assert failure["actor"] is None and failure["outcome"] == "denied" and failure["target"] == "GET /v1/models"
        denied = by_action["authz.denied"]
        assert denied["actor"].key_id == app.key_ids["member"] and denied["target"] == "GET /admin/v1/keys"
        flat = repr(app.audit.entries)
        for secret in (*app.keys.values(), made["key"], "Z" * 43):
            assert secret not in flat
