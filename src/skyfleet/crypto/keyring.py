"""Per-tenant data keys (DEKs): created on first use, stored wrapped in ``tenant_keys``, cached."""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select

from skyfleet.clock import Clock
from skyfleet.crypto.cipher import KEY_BYTES
from skyfleet.crypto.errors import DecryptionError
from skyfleet.crypto.providers.base import KeyProvider
from skyfleet.errors import ConflictError, NotFoundError, ServiceUnavailableError
from skyfleet.state.access import Database, SessionSource, wall_time
from skyfleet.state.models import Tenant, TenantKey

_CREATE_ATTEMPTS = 5
DEFAULT_CURRENT_TTL_S = 5.0


class TenantKeyring:
    """The tenants' DEKs, unwrapped through a :class:`KeyProvider` and cached for a bounded time.

    Several processes may share one database: the first DEK of a tenant is created race-free
    (primary key ``(tenant_id, version)``; the loser of a race re-reads the winner's key). A
    :meth:`shred` in another process takes effect here when the cache entries expire
    (``cache_ttl_s``); in this process at once.

    Which version is *current* (the one new records are sealed with) is re-read from the database
    every ``current_ttl_s`` (one indexed query per tenant, no provider call while the DEK itself is
    cached), so a :meth:`rotate` in another process is followed within seconds.
    """

    def __init__(
        self,
        store_engine_or_session_factory: SessionSource,
        provider: KeyProvider,
        clock: Clock,
        *,
        cache_ttl_s: float = 300.0,
        max_cached: int = 10_000,
        current_ttl_s: float | None = None,
    ) -> None:
        if cache_ttl_s < 0 or max_cached < 0 or (current_ttl_s is not None and current_ttl_s < 0):
            raise ValueError("cache_ttl_s, current_ttl_s and max_cached must not be negative")
        self._db = Database(store_engine_or_session_factory)
        self.provider = provider
        self._clock = clock
        self._ttl = cache_ttl_s
        #: How long "version N is current" is believed: at most 5 s, never longer than the DEK cache.
        self.current_ttl_s = min(cache_ttl_s, DEFAULT_CURRENT_TTL_S) if current_ttl_s is None else current_ttl_s
        self._max = max_cached
        self._keys: OrderedDict[tuple[str, int], tuple[bytes, float]] = OrderedDict()
        self._current: OrderedDict[str, tuple[int, float]] = OrderedDict()

    # -- public --

    @property
    def clock(self) -> Clock:
        return self._clock

    async def data_key(self, tenant_id: str, *, fresh: bool = False) -> tuple[int, bytes]:
        """The tenant's current (newest) DEK and its version; created on first use.

        ``fresh``: ask the database which version is current, whatever the cache believes.
        """
        version = None if fresh else self._cached_current(tenant_id)
        if version is not None and (dek := self._cached_key(tenant_id, version)) is not None:
            return version, dek
        for _ in range(_CREATE_ATTEMPTS):
            row = await self._latest(tenant_id)
            if row is not None:
                dek = self._cached_key(tenant_id, row.version)
                if dek is None:  # the DEK's own cache entry keeps its expiry: shreds elsewhere still land
                    dek = await self._unwrap(row)
                    self._remember(tenant_id, row.version, dek, current=False)
                self._set_current(tenant_id, row.version, force=fresh)
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

    async def versions(self, tenant_id: str) -> list[int]:
        """The tenant's DEK versions in the database, oldest first."""
        stmt = select(TenantKey.version).where(TenantKey.tenant_id == tenant_id).order_by(TenantKey.version)
        async with self._db.session() as session:
            return list((await session.execute(stmt)).scalars().all())

    async def created_at(self, tenant_id: str, version: int) -> datetime | None:
        """When the tenant's DEK ``version`` was created (None if there is no such version)."""
        async with self._db.session() as session:
            row = await session.get(TenantKey, (tenant_id, version))
        return None if row is None else row.created_at

    async def retire(self, tenant_id: str, *, below: int) -> list[int]:
        """Destroy the tenant's DEK versions older than ``below`` (their wrapped rows); which were deleted.

        Records still sealed with them no longer open: call this only once none is left (see
        :func:`skyfleet.state.reencrypt.rotate_dek`). A copy of the database (a backup) still holds
        the wrapped DEKs, and the KEK still unwraps them: only :meth:`shred` makes backups useless.
        """
        async with self._db.session(write=True) as session:
            deleted = (
                await session.execute(
                    delete(TenantKey)
                    .where(TenantKey.tenant_id == tenant_id, TenantKey.version < below)
                    .returning(TenantKey.version)
                )
            ).scalars().all()
        for version in deleted:
            self._keys.pop((tenant_id, version), None)
        if (current := self._current.get(tenant_id)) is not None and current[0] < below:
            del self._current[tenant_id]
        return sorted(deleted)

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
        self._keys[(tenant_id, version)] = (dek, self._clock.now() + self._ttl)
        self._keys.move_to_end((tenant_id, version))
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        if current:
            self._set_current(tenant_id, version)

    def _set_current(self, tenant_id: str, version: int, *, force: bool = False) -> None:
        if self._max == 0 or self._ttl == 0 or self.current_ttl_s == 0:
            return
        known = self._cached_current(tenant_id)
        if force or known is None or known <= version:
            self._current[tenant_id] = (version, self._clock.now() + self.current_ttl_s)
            self._current.move_to_end(tenant_id)
        while len(self._current) > self._max:
            self._current.popitem(last=False)
