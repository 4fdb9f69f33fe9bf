"""Authenticate a request from its bearer credential, without a database round trip on the hot path.

* Keys are looked up by their SHA-256 hash; results are cached in memory for ``ttl`` seconds
  (bounded size, oldest evicted first). Unknown keys are cached briefly too, so a flood of
  bad keys cannot hammer the database.
* Revocation reaches every gateway within about one second: each gateway polls the store for
  keys revoked since its last look (every ``revocation_poll_s``) and evicts them; the gateway
  that revokes evicts at once. Key expiry is checked on every use.
* Every failure is the same opaque :class:`AuthenticationError` (fail closed).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pydantic import SecretStr

from skyfleet.clock import Clock
from skyfleet.errors import AuthenticationError
from skyfleet.iam.apikeys import hash_key, looks_like_key
from skyfleet.iam.principal import PLATFORM_ADMIN, Principal
from skyfleet.state.repositories import Credential

log = logging.getLogger("skyfleet.auth")

_NEGATIVE_TTL_S = 1.0
#: Revocations are looked up with this much overlap, to tolerate clock skew between processes.
_REVOCATION_OVERLAP = timedelta(seconds=5)


class CredentialLookup(Protocol):
    async def lookup(self, key_hash: str) -> Credential | None: ...
    async def revoked_since(self, since: datetime) -> list[str]: ...


def _bearer(header: str | None) -> str:
    if not header or len(header) > 512:
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
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._ttl_s = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[Credential, float]] = OrderedDict()
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._admin_hash = hash_key(admin_key.get_secret_value()) if admin_key else None

    async def authenticate(self, header: str | None) -> Principal:
        token = _bearer(header)
        if not looks_like_key(token):
            raise AuthenticationError()
        digest = hash_key(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(tenant_id="_platform", tenant_name="_platform", role=PLATFORM_ADMIN, key_id="bootstrap")
        now = self._clock.now()
        cred = self._cached(digest, now)
        if cred is None:
            neg = self._negative.get(digest)
            if neg is not None and neg > now:
                raise AuthenticationError()
            cred = await self._keys.lookup(digest)
            if cred is None:
                self._remember_negative(digest, now)
                raise AuthenticationError()
            self._cache[digest] = (cred, now + self._ttl_s)
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if cred.expires_at is not None and cred.expires_at <= datetime.now(UTC):
            raise AuthenticationError()
        return Principal(tenant_id=cred.tenant_id, tenant_name=cred.tenant_name, role=cred.role, key_id=cred.key_id)

    def _cached(self, digest: str, now: float) -> Credential | None:
        hit = self._cache.get(digest)
        if hit is None:
            return None
        if hit[1] <= now:
            del self._cache[digest]
            return None
        return hit[0]

    def _remember_negative(self, digest: str, now: float) -> None:
        self._negative[digest] = now + _NEGATIVE_TTL_S
        if len(self._negative) > self._max:
            self._negative.popitem(last=False)

    def evict(self, hashes: list[str]) -> None:
        for digest in hashes:
            self._cache.pop(digest, None)

    def evict_all(self) -> None:
        self._cache.clear()

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
