"""Per-tenant data keys (DEKs): created on first use, stored wrapped in ``tenant_keys``, cached."""

from __future__ import annotations

from collections import OrderedDict

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select

from skyfleet.clock import Clock
from skyfleet.crypto.cipher import KEY_BYTES
from skyfleet.crypto.errors import DecryptionError
from skyfleet.crypto.provider import KeyProvider
from skyfleet.errors import ConflictError, NotFoundError, ServiceUnavailableError
from skyfleet.state.access import Database, SessionSource, wall_time
from skyfleet.state.models import Tenant, TenantKey

_CREATE_ATTEMPTS = 5


class TenantKeyring:
    """The tenants' DEKs, unwrapped through a :class:`KeyProvider` and cached for a bounded time.

    Several processes may share one database: the first DEK of a tenant is created race-free
    (primary key ``(tenant_id, version)``; the loser of a race re-reads the winner's key). A
    :meth:`shred` in another process takes effect here when the cache entries expire
    (``cache_ttl_s``); in this process at once.
    """

    def __init__(
        self,
        store_engine_or_session_factory: SessionSource,
        provider: KeyProvider,
        clock: Clock,
        *,
        cache_ttl_s: float = 300.0,
        max_cached: int = 10_000,
    ) -> None:
        if cache_ttl_s < 0 or max_cached < 0:
            raise ValueError("cache_ttl_s and max_cached must not be negative")
        self._db = Database(store_engine_or_session_factory)
        self.provider = provider
        self._clock = clock
        self._ttl = cache_ttl_s
        self._max = max_cached
        self._keys: OrderedDict[tuple[str, int], tuple[bytes, float]] = OrderedDict()
        self._current: OrderedDict[str, tuple[int, float]] = OrderedDict()

    # -- public --

    async def data_key(self, tenant_id: str) -> tuple[int, bytes]:
        """The tenant's current (newest) DEK and its version; created on first use."""
        version = self._cached_current(tenant_id)
        if version is not None and (dek := self._cached_key(tenant_id, version)) is not None:
            return version, dek
        for _ in range(_CREATE_ATTEMPTS):
            row = await self._latest(tenant_id)
            if row is not None:
                dek = await self._unwrap(row)
                self._remember(tenant_id, row.version, dek, current=True)
                return row.version, dek
            dek = await self._create(tenant_id, 1)
            if dek is not None:
                return 1, dek
        raise ServiceUnavailableError("could not create the tenant's data key")

    async def data_key_version(self, tenant_id: str, version: int) -> bytes:
        """The tenant's DEK ``version`` (to decrypt older records); :class:`DecryptionError` if gone."""
        if (dek := self._cached_key(tenant_id, version)) is not None:
            return dek
        async with self._db.session() as session:
            row = await session.get(TenantKey, (tenant_id, version))
        if row is None:
            raise DecryptionError
        dek = await self._unwrap(row)
        self._remember(tenant_id, version, dek, current=False)
        return dek

    async def rotate(self, tenant_id: str) -> int:
        """Start a new DEK version for new records; older versions keep decrypting old ones."""
        for _ in range(_CREATE_ATTEMPTS):
            latest = await self._latest(tenant_id)
            version = (latest.version if latest is not None else 0) + 1
            if await self._create(tenant_id, version) is not None:
                return version
        raise ServiceUnavailableError("could not rotate the tenant's data key")

    async def shred(self, tenant_id: str) -> None:
        """Crypto-shred the tenant: its KEK material at the provider, then every wrapped DEK row.

        The provider goes first: once it has forgotten the tenant, no copy of the wrapped DEKs
        (a database backup included) opens again, even if deleting the rows then fails.
        """
        self.forget(tenant_id)
        await self.provider.shred(tenant_id)
        async with self._db.session(write=True) as session:
            await session.execute(delete(TenantKey).where(TenantKey.tenant_id == tenant_id))
        self.forget(tenant_id)

    def forget(self, tenant_id: str | None = None) -> None:
        """Drop cached DEKs: the tenant's, or every tenant's."""
        if tenant_id is None:
            self._keys.clear()
            self._current.clear()
            return
        self._current.pop(tenant_id, None)
        for key in [k for k in self._keys if k[0] == tenant_id]:
            del self._keys[key]

    # -- database --

    async def _latest(self, tenant_id: str) -> TenantKey | None:
        stmt = (
            select(TenantKey)
            .where(TenantKey.tenant_id == tenant_id)
            .order_by(TenantKey.version.desc())
            .limit(1)
        )
        async with self._db.session() as session:
            return (await session.execute(stmt)).scalar_one_or_none()

    async def _create(self, tenant_id: str, version: int) -> bytes | None:
        """Persist a new wrapped DEK as ``version``; None if a concurrent writer took the version."""
        dek = AESGCM.generate_key(bit_length=256)
        wrapped = await self.provider.wrap(dek, tenant_id=tenant_id)
        row = TenantKey(
            tenant_id=tenant_id,
            version=version,
            wrapped_dek=wrapped,
            provider=self.provider.name,
            created_at=wall_time(self._clock),
        )
        try:
            async with self._db.session(write=True) as session:
                session.add(row)
        except ConflictError:  # the version exists now, or there is no such tenant
            async with self._db.session() as session:
                exists = await session.get(Tenant, tenant_id)
            if exists is None:
                raise NotFoundError("tenant not found", param="tenant") from None
            return None
        self._remember(tenant_id, version, dek, current=True)
        return dek

    async def _unwrap(self, row: TenantKey) -> bytes:
        if row.provider != self.provider.name:
            raise DecryptionError
        dek = await self.provider.unwrap(row.wrapped_dek, tenant_id=row.tenant_id)
        if len(dek) != KEY_BYTES:
            raise DecryptionError
        return dek

    # -- cache --

    def _cached_current(self, tenant_id: str) -> int | None:
        entry = self._current.get(tenant_id)
        if entry is None:
            return None
        if entry[1] <= self._clock.now():
            del self._current[tenant_id]
            return None
        return entry[0]

    def _cached_key(self, tenant_id: str, version: int) -> bytes | None:
        entry = self._keys.get((tenant_id, version))
        if entry is None:
            return None
        if entry[1] <= self._clock.now():
            del self._keys[(tenant_id, version)]
            return None
        self._keys.move_to_end((tenant_id, version))
        return entry[0]

    def _remember(self, tenant_id: str, version: int, dek: bytes, *, current: bool) -> None:
        if self._max == 0 or self._ttl == 0:
            return
        expires = self._clock.now() + self._ttl
        self._keys[(tenant_id, version)] = (dek, expires)
        self._keys.move_to_end((tenant_id, version))
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        if current:
            known = self._cached_current(tenant_id)
            if known is None or known <= version:
                self._current[tenant_id] = (version, expires)
                self._current.move_to_end(tenant_id)
            while len(self._current) > self._max:
                self._current.popitem(last=False)
