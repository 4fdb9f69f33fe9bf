"""IAM end to end: OIDC tokens, model and network allow-lists, key and tenant updates (real llama.cpp)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.harness import MODEL, Gateway, start_gateway, wait_until
from tests.unit.oidc_idp import AUDIENCE, Idp


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    server = Idp().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, idp: Idp) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("iam"), replicas=1, local__threads="1", auth_cache_ttl_s="1",
                      oidc__issuer=idp.issuer, oidc__audience=AUDIENCE, trusted_proxies='["127.0.0.1/32"]')
    wait_until(lambda: "Admin key" in g.keys, 10, what="bootstrap keys on stdout")
    yield g
    g.stop()


def _chat(client: openai.OpenAI) -> str:
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    return resp.choices[0].finish_reason or ""


def test_oidc_token_as_the_api_key(gw: Gateway, idp: Idp) -> None:
    token = idp.token(idp.claims(skyfleet_tenant="default", sub="alice"))
    assert _chat(gw.client(key=token))
    assert gw.metric("skyfleet_requests_total", tenant="default", status="completed") >= 1
    for bad in (idp.token(idp.claims(skyfleet_tenant="default", aud="other")),
                idp.token(idp.claims(skyfleet_tenant="nobody"))):
        with pytest.raises(openai.AuthenticationError):
            gw.client(key=bad).models.list()
    reader = idp.token(idp.claims(skyfleet_tenant="default", sub="bob", skyfleet_role="read-only"))
    assert [m.id for m in gw.client(key=reader).models.list().data] == [MODEL]
    with pytest.raises(openai.PermissionDeniedError):
        _chat(gw.client(key=reader))


def test_model_allow_list_and_update_through_cli(gw: Gateway) -> None:
    created = json.loads(gw.cli("keys", "create", "--tenant", "default", "--model", "some-other-model",
                                "--rpm", "1000", "--json").stdout)
    client = gw.client(key=created["key"])
    assert client.models.list().data == []
    with pytest.raises(openai.PermissionDeniedError) as err:
        _chat(client)
    assert err.value.body["code"] == "permission_denied" and err.value.body["param"] == "model"
    gw.cli("keys", "update", created["id"], "--model", MODEL, "--model", "some-other-model")
    listed = {k["id"]: k for k in json.loads(gw.cli("keys", "list", "--json").stdout)}
    assert listed[created["id"]]["models"] == sorted([MODEL, "some-other-model"])
    assert listed[created["id"]]["rpm_limit"] == 1000

    def allowed() -> bool:
        return [m.id for m in client.models.list().data] == [MODEL]

    wait_until(allowed, 5, 0.1, "the CLI change reaches the gateway (auth_cache_ttl_s=1)")
    assert _chat(client)


def test_cidr_allow_list_behind_a_trusted_proxy(gw: Gateway) -> None:
    r = gw.admin("POST", "/admin/v1/keys", json={"tenant": "default", "cidrs": ["10.0.0.0/8"]})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    with httpx.Client(base_url=gw.url, timeout=10) as h:
        headers = {"Authorization": f"Bearer {key}"}
        assert h.get("/v1/models", headers=headers).status_code == 401  # from 127.0.0.1
        # 127.0.0.1 is a trusted proxy here: it vouches for the right-most untrusted hop.
        assert h.get("/v1/models", headers={**headers, "X-Forwarded-For": "10.7.7.7"}).status_code == 200
        assert h.get("/v1/models", headers={**headers, "X-Forwarded-For": "10.7.7.7, 8.8.8.8"}).status_code == 401


def test_tenant_settings_through_cli_and_admin_api(gw: Gateway) -> None:
    out = json.loads(gw.cli("tenants", "update", "default", "--tpm", "500000", "--share-public-prefix",
                            "--json").stdout)
    assert (out["tpm_limit"], out["share_public_prefix"]) == (500000, True)
    r = gw.admin("PATCH", "/admin/v1/tenants/default", json={"rpm_limit": 100000, "share_public_prefix": False})
    assert r.status_code == 200, r.text
    assert (r.json()["rpm_limit"], r.json()["tpm_limit"], r.json()["share_public_prefix"]) == (100000, 500000, False)
    assert gw.cli("tenants", "update", "default", check=False).returncode != 0  # nothing to change
