"""OIDC: JWT bearer tokens verified against a real local JWKS server; every failure the same opaque 401."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from skyfleet.clock import ManualClock
from skyfleet.config import OidcSettings
from skyfleet.errors import AuthenticationError, NotFoundError
from skyfleet.iam.oidc import UNKNOWN_KID_REFETCH_S, OidcVerifier, looks_like_jwt, subject_key_id, times_valid
from skyfleet.state.repositories import TenantRecord
from tests.unit.iam_app import App, bearer, in_process_app
from tests.unit.oidc_idp import AUDIENCE, Idp


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    server = Idp().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def app(idp: Idp, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    oidc = {"issuer": idp.issuer, "audience": AUDIENCE}
    async with in_process_app(tmp_path_factory.mktemp("oidc"), oidc=oidc) as built:
        yield built


async def test_a_valid_token_works_with_the_openai_sdk(app: App, idp: Idp) -> None:
    token = idp.token()
    assert looks_like_jwt(token) and len(token) > 512
    page = await app.sdk(token).models.list()
    assert page.data == []  # no replicas in this app; the call was authenticated
    es = idp.token(idp.claims(sub="user-2", skyfleet_role="read-only"), kid="ec1")
    p = await app.gw.auth.authenticate(f"Bearer {es}")
    assert (p.tenant_name, p.role, p.key_id) == ("acme", "read-only", subject_key_id(idp.issuer, "user-2"))
    p = await app.gw.auth.authenticate(f"Bearer {token}")
    assert p.role == "member" and p.key_id.startswith("oidc:") and "user-1" not in p.key_id


async def test_oidc_roles_are_authorised_like_keys(app: App, idp: Idp) -> None:
    async with app.http() as h:
        ro = idp.token(idp.claims(sub="ro", skyfleet_role="read-only"))
        r = await h.post("/v1/chat/completions", json={}, headers=bearer(ro))
        assert r.status_code == 403
        ta = idp.token(idp.claims(sub="ta", skyfleet_role="tenant-admin"))
        r = await h.get("/admin/v1/keys", headers=bearer(ta))
        assert r.status_code == 200 and {k["tenant"] for k in r.json()["data"]} == {"acme"}
        assert (await h.get("/admin/v1/tenants", headers=bearer(ta))).status_code == 403


def _bad_tokens(idp: Idp) -> dict[str, str]:
    now = time.time()
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = idp.claims()
    return {
        "expired": idp.token(idp.claims(exp=int(now) - 120, iat=int(now) - 600)),
        "not yet valid": idp.token(idp.claims(nbf=int(now) + 600)),
        "issued in the future": idp.token(idp.claims(iat=int(now) + 600, exp=int(now) + 900)),
        "wrong audience": idp.token(idp.claims(aud="someone-else")),
        "wrong issuer": idp.token(idp.claims(iss="https://evil.example")),
        "wrongly signed": idp.token(claims, kid="rsa1", key=attacker),
        "unknown kid": idp.token(claims, kid="nope", key=idp.rsa_key),
        "alg none": idp.unsigned_token(claims),
        "HS256 with the public key": idp.hs256_with_public_key(claims),
        "RS256 header on the EC key": idp.token(claims, kid="ec1", key=idp.rsa_key, alg="RS256"),
        "no exp": idp.token(idp.claims(exp=None)),
        "no sub": idp.token(idp.claims(sub=None)),
        "missing tenant claim": idp.token(idp.claims(skyfleet_tenant=None)),
        "tenant claim not a string": idp.token(idp.claims(skyfleet_tenant=["acme"])),
        "unknown tenant": idp.token(idp.claims(skyfleet_tenant="initech")),
        "bad role": idp.token(idp.claims(skyfleet_role="emperor")),
        "platform-admin not allowed": idp.token(idp.claims(skyfleet_role="platform-admin")),
        "tampered payload": (lambda t: t.split(".")[0] + "." + idp.token(idp.claims(sub="admin")).split(".")[1]
                             + "." + t.split(".")[2])(idp.token(claims)),
    }


async def test_every_bad_token_gets_the_same_opaque_401(app: App, idp: Idp) -> None:
    async with app.http() as h:
        reference = await h.get("/v1/models", headers=bearer("sk-sf-" + "B" * 43))
        assert reference.status_code == 401
        for why, token in _bad_tokens(idp).items():
            r = await h.get("/v1/models", headers=bearer(token))
            assert (r.status_code, r.content, r.headers.get("www-authenticate")) == \
                (401, reference.content, reference.headers.get("www-authenticate")), why
    with pytest.raises(openai.AuthenticationError):
        await app.sdk(_bad_tokens(idp)["expired"]).models.list()
    # Deleting the tenant ends its tokens on this gateway at once.
    await app.gw.store.tenants.create("doomed")
    token = idp.token(idp.claims(skyfleet_tenant="doomed"))
    assert (await app.gw.auth.authenticate(f"Bearer {token}")).tenant_name == "doomed"
    async with app.http() as h:
        assert (await h.delete("/admin/v1/tenants/doomed", headers=bearer(app.keys["bootstrap"]))).status_code == 200
        assert (await h.get("/v1/models", headers=bearer(token))).status_code == 401


# -- the verifier on a manual clock --------------------------------------------------------------


class Tenants:
    def __init__(self) -> None:
        self.calls = 0

    async def get(self, name: str) -> TenantRecord:
        self.calls += 1
        if name != "acme":
            raise NotFoundError("no such tenant")
        from datetime import UTC, datetime

        return TenantRecord("ten_acme", "acme", datetime.now(UTC), rpm_limit=7, share_public_prefix=True)


def _verifier(idp: Idp, clock: ManualClock, **settings: Any) -> tuple[OidcVerifier, Tenants]:
    tenants = Tenants()
    conf = OidcSettings(issuer=idp.issuer, audience=AUDIENCE, **settings)
    return OidcVerifier(conf, tenants, clock), tenants


async def test_tokens_are_cached_briefly_and_never_past_exp(idp: Idp) -> None:
    clock = ManualClock(wall_offset=time.time())
    verifier, tenants = _verifier(idp, clock, token_cache_s=10, leeway_s=0)
    try:
        long_lived = idp.token(idp.claims(now=clock.wall()))
        p = await verifier.verify(long_lived)
        assert (p.tenant_rpm_limit, p.share_public_prefix) == (7, True)
        await verifier.verify(long_lived)
        assert tenants.calls == 1  # the second use came from the cache
        clock.advance(10)
        await verifier.verify(long_lived)
        assert tenants.calls == 2  # re-verified after token_cache_s
        short = idp.token(idp.claims(now=clock.wall(), sub="short", exp=int(clock.wall()) + 3))
        await verifier.verify(short)
        clock.advance(3.5)
        with pytest.raises(AuthenticationError):
            await verifier.verify(short)  # the cache did not outlive the token
    finally:
        await verifier.close()


async def test_jwks_is_cached_and_an_unknown_kid_refetches_at_most_every_30s(idp: Idp) -> None:
    clock = ManualClock(wall_offset=time.time())
    verifier, _ = _verifier(idp, clock, jwks_cache_s=300, leeway_s=0, token_cache_s=0)
    try:
        start = idp.jwks_hits
        await verifier.verify(idp.token(idp.claims(now=clock.wall())))
        assert idp.jwks_hits == start + 1
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rotated = idp.token(idp.claims(now=clock.wall(), exp=int(clock.wall()) + 3600), kid="rsa2", key=new_key)
        idp.published["rsa2"] = new_key
        try:
            # The key set was fetched just now: a flood of unknown kids does not refetch it.
            for _ in range(5):
                with pytest.raises(AuthenticationError):
                    await verifier.verify(rotated)
            assert idp.jwks_hits == start + 1
            clock.advance(UNKNOWN_KID_REFETCH_S)
            assert (await verifier.verify(rotated)).tenant_name == "acme"
            assert idp.jwks_hits == start + 2
            for _ in range(3):
                with pytest.raises(AuthenticationError):
                    await verifier.verify(idp.token(idp.claims(now=clock.wall()), kid="ghost", key=new_key))
            assert idp.jwks_hits == start + 2
            clock.advance(300)  # the cache expired: refetched on the next use
            await verifier.verify(idp.token(idp.claims(now=clock.wall())))
            assert idp.jwks_hits == start + 3
        finally:
            idp.published.pop("rsa2")
    finally:
        await verifier.close()


async def test_discovery_naming_another_issuer_is_refused(idp: Idp) -> None:
    clock = ManualClock(wall_offset=time.time())
    verifier, _ = _verifier(idp, clock)
    idp.issuer_override = "https://evil.example"
    try:
        with pytest.raises(AuthenticationError):
            await verifier.verify(idp.token(idp.claims(now=clock.wall())))
    finally:
        idp.issuer_override = None
        await verifier.close()


async def test_an_unreachable_jwks_fails_closed() -> None:
    clock = ManualClock(wall_offset=time.time())
    idp = Idp().start()
    token = idp.token(idp.claims(now=clock.wall()))
    verifier, _ = _verifier(idp, clock, jwks_url="http://127.0.0.1:9/jwks.json")
    try:
        with pytest.raises(AuthenticationError):
            await verifier.verify(token)
    finally:
        idp.stop()
        await verifier.close()


@given(st.floats(0, 2e9), st.floats(-1e6, 1e6), st.floats(0, 300), st.sampled_from(["exp", "nbf", "iat"]))
def test_times_valid(now: float, offset: float, leeway: float, claim: str) -> None:
    claims: dict[str, Any] = {"exp": now + 3600}
    claims[claim] = now + offset
    ok = times_valid(claims, now, leeway)
    if claim == "exp":
        assert ok == (now + offset > now - leeway)
    else:
        assert ok == (now + offset <= now + leeway)


@pytest.mark.parametrize("claims", [{}, {"exp": "soon"}, {"exp": True}, {"exp": 4e9, "nbf": "x"}])
def test_times_valid_needs_numeric_exp(claims: dict[str, Any]) -> None:
    assert not times_valid(claims, 1e9, 0)


@pytest.mark.parametrize("settings", [
    {"issuer": "https://idp.example"},  # no audience
    {"issuer": "http://idp.example", "audience": "a"},  # plain HTTP off loopback
    {"issuer": "https://idp.example", "audience": "a", "jwks_url": "http://idp.example/jwks"},
    {"issuer": "https://idp.example", "audience": "a", "algorithms": ["HS256"]},
    {"issuer": "https://idp.example", "audience": "a", "algorithms": ["none"]},
    {"issuer": "https://idp.example", "audience": "a", "algorithms": []},
    {"issuer": "https://idp.example", "audience": "a", "default_role": "platform-admin"},
])
def test_unsafe_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OidcSettings(**settings)


async def test_without_oidc_a_jwt_is_just_a_bad_key(tmp_path: Path, idp: Idp) -> None:
    async with in_process_app(tmp_path) as app, app.http() as h:
        assert (await h.get("/v1/models", headers=bearer(idp.token()))).status_code == 401
