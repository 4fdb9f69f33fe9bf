"""Authenticate a request from its bearer credential, without a database round trip on the hot path.

* Keys are looked up by their SHA-256 hash; results are cached in memory for ``ttl`` seconds
  (bounded size, oldest evicted first). Unknown keys are cached briefly too, so a flood of
  bad keys cannot hammer the database.
* Revocation reaches every gateway within about one second: each gateway polls the store for
  keys revoked since its last look (every ``revocation_poll_s``) and evicts them; the gateway
  that revokes evicts at once. Key expiry is checked on every use.
* A key with a CIDR allow-list is refused (the same opaque error) from any other client address;
  see :mod:`skyfleet.iam.cidr` for how the address is found behind trusted proxies.
* Anything that is not shaped like a key is tried as an OIDC JWT when OIDC is configured
  (:mod:`skyfleet.iam.oidc`).
* Every failure is the same opaque :class:`AuthenticationError` (fail closed).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from pydantic import SecretStr

from skyfleet.clock import Clock
from skyfleet.errors import AuthenticationError
from skyfleet.iam.apikeys import hash_key, looks_like_key
from skyfleet.iam.cidr import IPNetwork, admitted, client_address, parse_networks
from skyfleet.iam.principal import PLATFORM_ADMIN, Principal
from skyfleet.state.repositories import Credential

if TYPE_CHECKING:
    from skyfleet.iam.oidc import OidcVerifier

log = logging.getLogger("skyfleet.auth")

_NEGATIVE_TTL_S = 1.0
#: Revocations are looked up with this much overlap, to tolerate clock skew between processes.
_REVOCATION_OVERLAP = timedelta(seconds=5)


class CredentialLookup(Protocol):
    async def lookup(self, key_hash: str) -> Credential | None: ...
    async def revoked_since(self, since: datetime) -> list[str]: ...


#: Longest Authorization header accepted (a JWT with a few claims fits; a key needs ~60).
MAX_HEADER_LENGTH = 8192
_BOOTSTRAP = Principal(tenant_id="_platform", tenant_name="_platform", role=PLATFORM_ADMIN, key_id="bootstrap")


@dataclass(frozen=True, slots=True)
class _Entry:
    """A cached, looked-up key: its Principal and what is checked on every use."""

    principal: Principal
    #: Wall-clock expiry (Unix seconds); None: never.
    expires_at: float | None
    networks: tuple[IPNetwork, ...] | None
    cached_until: float


def principal_of(cred: Credential) -> Principal:
    return Principal(
        tenant_id=cred.tenant_id, tenant_name=cred.tenant_name, role=cred.role, key_id=cred.key_id,
        models=cred.models, rpm_limit=cred.rpm_limit, tpm_limit=cred.tpm_limit,
        tenant_rpm_limit=cred.tenant_rpm_limit, tenant_tpm_limit=cred.tenant_tpm_limit,
        share_public_prefix=cred.share_public_prefix,
    )


def _bearer(header: str | None) -> str:
    if not header or len(header) > MAX_HEADER_LENGTH:
        raise AuthenticationError()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationError()
    return token.strip()


class Authenticator:
    def __init__(
        self,
        keys: CredentialLookup,
        clock: Clock,
        *,
        ttl_s: float,
        admin_key: SecretStr | None = None,
        max_entries: int = 100_000,
        trusted_proxies: Sequence[IPNetwork] = (),
        oidc: OidcVerifier | None = None,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._ttl_s = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._admin_hash = hash_key(admin_key.get_secret_value()) if admin_key else None
        self._trusted = parse_networks(str(n) for n in trusted_proxies)
        self._oidc = oidc

    async def close(self) -> None:
        if self._oidc is not None:
            await self._oidc.close()

    async def authenticate(
        self, header: str | None, *, peer: str | None = None, forwarded_for: str | None = None
    ) -> Principal:
        """The caller of a request with this Authorization header, from TCP peer ``peer``.

        ``forwarded_for`` (X-Forwarded-For) is only believed from a trusted proxy.
        """
        token = _bearer(header)
        if not looks_like_key(token):
            if self._oidc is not None:
                from skyfleet.iam.oidc import looks_like_jwt

                if looks_like_jwt(token):
                    return await self._oidc.verify(token)
            raise AuthenticationError()
        digest = hash_key(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return _BOOTSTRAP
        now = self._clock.now()
        entry = self._cached(digest, now)
        if entry is None:
            neg = self._negative.get(digest)
            if neg is not None and neg > now:
                raise AuthenticationError()
            cred = await self._keys.lookup(digest)
            if cred is None:
                self._remember_negative(digest, now)
                raise AuthenticationError()
            entry = _Entry(
                principal_of(cred),
                cred.expires_at.timestamp() if cred.expires_at is not None else None,
                parse_networks(cred.cidrs) if cred.cidrs is not None else None,
                now + self._ttl_s,
            )
            self._cache[digest] = entry
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if entry.expires_at is not None and entry.expires_at <= self._clock.wall():
            raise AuthenticationError()
        if entry.networks is not None and not admitted(client_address(peer, forwarded_for, self._trusted),
                                                       entry.networks):
            raise AuthenticationError()
        return entry.principal

    def _cached(self, digest: str, now: float) -> _Entry | None:
        hit = self._cache.get(digest)
        if hit is None:
            return None
        if hit.cached_until <= now:
            del self._cache[digest]
            return None
        return hit

    def _remember_negative(self, digest: str, now: float) -> None:
        self._negative[digest] = now + _NEGATIVE_TTL_S
        if len(self._negative) > self._max:
            self._negative.popitem(last=False)

    def evict(self, hashes: list[str]) -> None:
        for digest in hashes:
            self._cache.pop(digest, None)

    def evict_all(self) -> None:
        self._cache.clear()
        if self._oidc is not None:
            self._oidc.evict(lambda p: True)

    def evict_key(self, key_id: str) -> None:
        """Forget one key (after an admin changed it); a scan, for rare admin actions only."""
        for digest in [d for d, e in self._cache.items() if e.principal.key_id == key_id]:
            del self._cache[digest]

    def evict_tenant(self, tenant_id: str) -> None:
        """Forget every cached credential of a tenant (its limits changed, or it was deleted)."""
        for digest in [d for d, e in self._cache.items() if e.principal.tenant_id == tenant_id]:
            del self._cache[digest]
        if self._oidc is not None:
            self._oidc.evict(lambda p: p.tenant_id == tenant_id)

    async def watch_revocations(self, interval_s: float) -> None:
        """Poll the store for revoked keys forever (run as a background task)."""
        since = datetime.now(UTC) - _REVOCATION_OVERLAP
        while True:
            await asyncio.sleep(interval_s)
            started = datetime.now(UTC)
            try:
                revoked = await self._keys.revoked_since(since)
            except Exception as exc:  # noqa: BLE001 - a store outage must not kill the watcher
                # Fail closed: if we cannot learn about revocations, stop trusting the cache.
                log.warning("revocation poll failed; clearing the auth cache", extra={"error": type(exc).__name__})
                self.evict_all()
                continue
            if revoked:
                self.evict(revoked)
            since = started - _REVOCATION_OVERLAP
