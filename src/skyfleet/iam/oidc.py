"""OpenID Connect: JWT bearer tokens from one issuer, verified against its JWKS.

* The JWKS URL is configured or read from the issuer's ``/.well-known/openid-configuration``;
  both must be HTTPS (plain HTTP only on a loopback host, for development and tests). It is
  fetched with aiohttp (never a blocking client on the event loop), cached ``jwks_cache_s``, and
  refetched early at most once per 30 s when a token names an unknown ``kid``. When a refresh
  fails the previous key set stays usable for one more ``jwks_cache_s``, then tokens fail.
* A token must name a ``kid`` of the set, use one of the configured algorithms (asymmetric only:
  never ``none`` or ``HS*``) matching that key's type, carry ``iss``, ``aud``, ``sub`` and ``exp``,
  and be within its validity (``exp``, ``nbf``, ``iat`` with ``leeway_s``) at the clock's ``now``.
* Claims map to the caller: ``tenant_claim`` names a live tenant, ``role_claim`` (default
  ``default_role``) one of the roles; platform-admin only with ``allow_platform_admin``.
* Verified tokens are cached ``token_cache_s``, never past their ``exp``.
* Every failure is the same opaque :class:`AuthenticationError` (fail closed); reasons are logged
  at debug level without token material.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import orjson

from skyfleet.clock import Clock
from skyfleet.config import OidcSettings
from skyfleet.errors import AuthenticationError, NotFoundError
from skyfleet.iam.authz import ROLES
from skyfleet.iam.principal import PLATFORM_ADMIN, Principal
from skyfleet.state.repositories import TenantRecord

log = logging.getLogger("skyfleet.auth.oidc")

#: An unknown ``kid`` triggers a refetch at most this often.
UNKNOWN_KID_REFETCH_S = 30.0
#: After a failed fetch, wait this long before the next attempt.
FAILED_FETCH_RETRY_S = 5.0
MAX_TOKEN_LENGTH = 8192
MAX_JWKS_BYTES = 1 << 20
_JWT_RE = re.compile(r"[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}", re.ASCII)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
#: The key type each algorithm family needs.
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class JwksUnavailable(Exception):
    """The discovery document or the JWKS could not be fetched or parsed."""


class JsonFetcher(Protocol):
    async def get_json(self, url: str) -> Any: ...
    async def close(self) -> None: ...


class TenantLookup(Protocol):
    async def get(self, name: str) -> TenantRecord: ...


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments: the shape of a compact JWS (checked before any work)."""
    return len(token) <= MAX_TOKEN_LENGTH and _JWT_RE.fullmatch(token) is not None


def secure_url(url: str) -> bool:
    """HTTPS, or HTTP to a loopback host only."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK)


def subject_key_id(issuer: str, subject: str) -> str:
    """The Principal's ``key_id`` for a token subject: stable, short, not reversible to a name."""
    return "oidc:" + hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()[:20]


def times_valid(claims: dict[str, Any], now: float, leeway_s: float) -> bool:
    """``exp`` (required) is after ``now``, ``nbf`` and ``iat`` (if present) not after it, with leeway."""

    def number(name: str) -> float | None:
        value = claims.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    exp = number("exp")
    if exp is None or exp <= now - leeway_s:
        return False
    for name in ("nbf", "iat"):
        if name in claims:
            value = number(name)
            if value is None or value > now + leeway_s:
                return False
    return True


class HttpJsonFetcher:
    """GET a small JSON document with aiohttp (own session, opened on first use, on the running loop)."""

    def __init__(self, timeout_s: float = 5.0, max_bytes: int = MAX_JWKS_BYTES) -> None:
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._session: Any = None

    async def get_json(self, url: str) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        try:
            async with self._session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as r:
                if r.status != 200:
                    raise JwksUnavailable(f"HTTP {r.status}")
                body = await r.content.read(self._max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksUnavailable(type(exc).__name__) from None
        if len(body) > self._max_bytes:
            raise JwksUnavailable("document too large")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise JwksUnavailable("not JSON") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class _Key:
    kty: str
    alg: str | None
    key: Any


def parse_jwks(doc: Any) -> dict[str, _Key]:
    """kid -> public key, for the signing keys of a JWKS document (others are skipped)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksUnavailable("not a JWKS document")
    keys: dict[str, _Key] = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        if any(name in jwk for name in ("d", "p", "q", "k")):  # private or symmetric material: refuse it
            continue
        try:
            parsed = jwt.PyJWK(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        alg = jwk.get("alg")
        keys[jwk["kid"]] = _Key(str(jwk.get("kty")), alg if isinstance(alg, str) else None, parsed.key)
    return keys


class JwksCache:
    def __init__(self, settings: OidcSettings, fetcher: JsonFetcher, clock: Clock) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_ok = True
        self._jwks_url = settings.jwks_url
        self._lock = asyncio.Lock()

    def _may_attempt(self, now: float, min_gap: float) -> bool:
        if self._last_attempt is None:
            return True
        return now - self._last_attempt >= (min_gap if self._last_ok else FAILED_FETCH_RETRY_S)

    async def key(self, kid: str) -> _Key | None:
        now = self._clock.now()
        ttl = self._settings.jwks_cache_s
        age = None if self._fetched_at is None else now - self._fetched_at
        if age is not None and age < ttl and kid in self._keys:
            return self._keys[kid]
        stale = age is None or age >= ttl
        if self._may_attempt(now, 0.0 if stale else UNKNOWN_KID_REFETCH_S):
            seen = self._last_attempt
            async with self._lock:
                if self._last_attempt == seen:  # nobody fetched while we waited for the lock
                    await self._refresh()
        now = self._clock.now()
        if self._fetched_at is None or now - self._fetched_at >= 2 * ttl:
            return None  # never fetched, or stale past the grace period: fail closed
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._last_attempt = self._clock.now()
        try:
            url = self._jwks_url or await self._discover()
            keys = parse_jwks(await self._fetcher.get_json(url))
        except JwksUnavailable as exc:
            self._last_ok = False
            log.warning("OIDC key set unavailable", extra={"error": str(exc)[:100]})
            return
        self._keys, self._fetched_at, self._last_ok = keys, self._clock.now(), True

    async def _discover(self) -> str:
        issuer = self._settings.issuer or ""
        doc = await self._fetcher.get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if not isinstance(doc, dict) or doc.get("issuer") != issuer:
            raise JwksUnavailable("discovery document names another issuer")
        url = doc.get("jwks_uri")
        if not isinstance(url, str) or not secure_url(url):
            raise JwksUnavailable("jwks_uri missing or not https")
        self._jwks_url = url
        return url


class OidcVerifier:
    """Turn a JWT into a :class:`Principal`, or raise :class:`AuthenticationError`."""

    def __init__(
        self,
        settings: OidcSettings,
        tenants: TenantLookup,
        clock: Clock,
        *,
        fetcher: JsonFetcher | None = None,
        max_entries: int = 10_000,
    ) -> None:
        if not settings.issuer or not settings.audience:
            raise ValueError("OIDC needs an issuer and an audience")
        self._settings = settings
        self._tenants = tenants
        self._clock = clock
        self._fetcher = fetcher or HttpJsonFetcher()
        self._jwks = JwksCache(settings, self._fetcher, clock)
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._max = max_entries

    async def close(self) -> None:
        await self._fetcher.close()

    def evict(self, predicate: Callable[[Principal], bool]) -> None:
        """Forget the verified tokens whose Principal matches (e.g. of a deleted tenant)."""
        for digest in [d for d, (p, _) in self._cache.items() if predicate(p)]:
            del self._cache[digest]

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock.now()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[digest]
        principal, exp = await self._verify(token)
        keep = min(self._settings.token_cache_s, exp - self._clock.wall())
        if keep > 0:
            self._cache[digest] = (principal, self._clock.now() + keep)
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return principal

    def _reject(self, why: str) -> AuthenticationError:
        log.debug("OIDC token rejected", extra={"reason": why})
        return AuthenticationError()

    async def _verify(self, token: str) -> tuple[Principal, float]:
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise self._reject("malformed header") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise self._reject("algorithm not allowed")
        if not isinstance(kid, str) or not kid:
            raise self._reject("no kid")
        key = await self._jwks.key(kid)
        if key is None:
            raise self._reject("unknown kid")
        if _KTY.get(alg[:2]) != key.kty or (key.alg is not None and key.alg != alg):
            raise self._reject("algorithm does not match the key")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=s.audience, issuer=s.issuer,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except (jwt.PyJWTError, TypeError, ValueError):
            raise self._reject("signature or claims") from None
        if not times_valid(claims, self._clock.wall(), s.leeway_s):
            raise self._reject("expired or not yet valid")
        subject = claims.get("sub")
        tenant_name = claims.get(s.tenant_claim)
        role = claims.get(s.role_claim, s.default_role)
        if not isinstance(subject, str) or not subject or not isinstance(tenant_name, str):
            raise self._reject("subject or tenant claim missing")
        if role not in ROLES or (role == PLATFORM_ADMIN and not s.allow_platform_admin):
            raise self._reject("role not allowed")
        try:
            tenant = await self._tenants.get(tenant_name)
        except NotFoundError:
            raise self._reject("unknown tenant") from None
        principal = Principal(
            tenant_id=tenant.id, tenant_name=tenant.name, role=role, key_id=subject_key_id(s.issuer or "", subject),
            tenant_rpm_limit=tenant.rpm_limit, tenant_tpm_limit=tenant.tpm_limit,
            share_public_prefix=tenant.share_public_prefix,
        )
        return principal, float(claims["exp"])
