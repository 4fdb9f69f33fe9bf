"""Tenants and API keys: the state store's repositories and the :class:`Store` that holds them.

This is the boundary where SQLAlchemy stops: every database error leaves as an error of
:mod:`skyfleet.errors` (a uniqueness violation as :class:`ConflictError`, anything else as
:class:`ServiceUnavailableError`). Plaintext keys are never stored; see :mod:`skyfleet.iam.apikeys`.
"""

from __future__ import annotations

import asyncio
import builtins
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Select, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from skyfleet.clock import Clock, SystemClock
from skyfleet.config import ConfigError
from skyfleet.errors import ConflictError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from skyfleet.iam.apikeys import display_prefix, generate_key, hash_key
from skyfleet.state.db import WRITE_OPTIONS, make_engine, make_session_factory, migrate
from skyfleet.state.models import KEY_ID_PREFIX, TENANT_ID_PREFIX, ApiKey, Tenant, new_id, utcnow

if TYPE_CHECKING:  # runtime imports are deferred: skyfleet.crypto imports this package
    from skyfleet.crypto import KeyProvider, TenantKeyring
    from skyfleet.state.conversations import ConversationRepository, ResponseRepository

ROLES = ("platform-admin", "tenant-admin", "member", "read-only")
TENANT_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
KEY_NAME_MAX_LENGTH = 200
RETENTION_DAYS_MAX = 36_500

_T = TypeVar("_T")

_TENANT_NAME_RE = re.compile(TENANT_NAME_PATTERN, re.ASCII)
_KEY_HASH_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    name: str
    created_at: datetime
    #: Conversations and responses older than this many days are swept; None keeps them.
    retention_days: int | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    tenant_id: str
    tenant_name: str
    name: str | None
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Credential:
    """What authentication needs about a key; never holds the plaintext key."""

    key_id: str
    key_hash: str
    tenant_id: str
    tenant_name: str
    role: str
    expires_at: datetime | None


def _require_aware(value: datetime, param: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequestError(f"'{param}' must be a timezone-aware datetime", param=param)
    return value.astimezone(UTC)


def _valid_tenant_name(name: str) -> bool:
    return isinstance(name, str) and _TENANT_NAME_RE.fullmatch(name) is not None


class _Repository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._read = make_session_factory(engine)
        self._write = make_session_factory(engine.execution_options(**WRITE_OPTIONS))

    @asynccontextmanager
    async def _session(
        self, *, write: bool = False, conflict: str = "conflict"
    ) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction, committed on success; database errors mapped."""
        try:
            async with (self._write if write else self._read)() as session, session.begin():
                yield session
        except IntegrityError:
            raise ConflictError(conflict) from None
        except (SQLAlchemyError, OSError) as exc:
            raise ServiceUnavailableError("the state store is unavailable") from exc


class TenantRepository(_Repository):
    async def create(self, name: str) -> TenantRecord:
        """A new tenant; its name is unique among live tenants."""
        if not _valid_tenant_name(name):
            raise InvalidRequestError(
                "tenant name must be 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter "
                "or digit",
                param="name",
            )
        row = Tenant(id=new_id(TENANT_ID_PREFIX), name=name, created_at=utcnow(), deleted_at=None)
        async with self._session(write=True, conflict=f"tenant '{name}' already exists") as session:
            session.add(row)
        return _tenant_record(row)

    async def get(self, name: str) -> TenantRecord:
        if _valid_tenant_name(name):
            async with self._session() as session:
                row = (await session.execute(_live_tenant(name))).scalar_one_or_none()
            if row is not None:
                return _tenant_record(row)
        raise NotFoundError(f"tenant '{name[:100]}' not found", param="tenant")

    async def list(self) -> builtins.list[TenantRecord]:
        """Live tenants, ordered by name."""
        stmt = select(Tenant).where(Tenant.deleted_at.is_(None)).order_by(Tenant.name)
        async with self._session() as session:
            rows = (await session.execute(stmt)).scalars().all()
        return [_tenant_record(r) for r in rows]

    async def set_retention(self, name: str, days: int | None) -> TenantRecord:
        """Keep the tenant's conversations and responses ``days`` days (None: indefinitely)."""
        if days is not None and (
            isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= RETENTION_DAYS_MAX
        ):
            raise InvalidRequestError(
                f"retention_days must be an integer from 1 to {RETENTION_DAYS_MAX}, or null",
                param="retention_days",
            )
        async with self._session(write=True) as session:
            row = (
                await session.execute(
                    update(Tenant)
                    .where(Tenant.name == name, Tenant.deleted_at.is_(None))
                    .values(retention_days=days)
                    .returning(Tenant)
                    .execution_options(synchronize_session=False)
                )
            ).scalar_one_or_none()
            if row is None:
                raise NotFoundError(f"tenant '{str(name)[:100]}' not found", param="tenant")
            return _tenant_record(row)

    async def delete(self, name: str) -> None:
        """Soft-delete the tenant and revoke all of its keys, in one transaction."""
        now = utcnow()
        async with self._session(write=True) as session:
            tenant_id = (
                await session.execute(
                    update(Tenant)
                    .where(Tenant.name == name, Tenant.deleted_at.is_(None))
                    .values(deleted_at=now)
                    .returning(Tenant.id)
                    .execution_options(synchronize_session=False)
                )
            ).scalar_one_or_none()
            if tenant_id is None:
                raise NotFoundError(f"tenant '{name[:100]}' not found", param="tenant")
            await session.execute(
                update(ApiKey)
                .where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=now)
                .execution_options(synchronize_session=False)
            )


def _tenant_record(row: Tenant) -> TenantRecord:
    return TenantRecord(
        id=row.id, name=row.name, created_at=row.created_at, retention_days=row.retention_days
    )


def _live_tenant(name: str) -> Select[Tenant]:
    return select(Tenant).where(Tenant.name == name, Tenant.deleted_at.is_(None))


def _key_records() -> Select[str, str, str, str | None, str, str, datetime, datetime | None, datetime | None]:
    return select(
        ApiKey.id,
        ApiKey.tenant_id,
        Tenant.name.label("tenant_name"),
        ApiKey.name.label("key_name"),
        ApiKey.role,
        ApiKey.prefix,
        ApiKey.created_at,
        ApiKey.revoked_at,
        ApiKey.expires_at,
    ).join(Tenant, Tenant.id == ApiKey.tenant_id)


def _key_record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        tenant_id=row.tenant_id,
        tenant_name=row.tenant_name,
        name=row.key_name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        expires_at=row.expires_at,
    )


class ApiKeyRepository(_Repository):
    async def create(
        self,
        tenant_name: str,
        *,
        role: str = "member",
        name: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key for a live tenant. Returns the plaintext key: the only time it exists."""
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of: {', '.join(ROLES)}", param="role")
        if name is not None and (not isinstance(name, str) or len(name) > KEY_NAME_MAX_LENGTH):
            raise InvalidRequestError(
                f"key name must be at most {KEY_NAME_MAX_LENGTH} characters", param="name"
            )
        if expires_at is not None:
            expires_at = _require_aware(expires_at, "expires_at")
        key = generate_key()
        async with self._session(write=True) as session:
            # FOR SHARE (PostgreSQL): a concurrent tenant delete waits for this key to commit, so
            # it also revokes it. SQLite's BEGIN IMMEDIATE already serialises the two.
            tenant = (
                await session.execute(
                    select(Tenant.id, Tenant.name)
                    .where(Tenant.name == tenant_name, Tenant.deleted_at.is_(None))
                    .with_for_update(read=True)
                )
            ).one_or_none()
            if tenant is None:
                raise NotFoundError(f"tenant '{str(tenant_name)[:100]}' not found", param="tenant")
            row = ApiKey(
                id=new_id(KEY_ID_PREFIX),
                tenant_id=tenant.id,
                name=name,
                role=role,
                prefix=display_prefix(key),
                key_hash=hash_key(key),
                created_at=utcnow(),
                revoked_at=None,
                expires_at=expires_at,
            )
            session.add(row)
        record = KeyRecord(
            id=row.id,
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            name=name,
            role=role,
            prefix=row.prefix,
            created_at=row.created_at,
            revoked_at=None,
            expires_at=expires_at,
        )
        return key, record

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key. Idempotent: a second revoke keeps the first ``revoked_at``."""
        async with self._session(write=True) as session:
            await session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            row = (await session.execute(_key_records().where(ApiKey.id == key_id))).one_or_none()
            if row is None:
                raise NotFoundError(f"API key '{str(key_id)[:100]}' not found", param="key_id")
        return _key_record(row)

    async def list(self, tenant_name: str | None = None) -> builtins.list[KeyRecord]:
        """Keys (revoked ones included) of one live tenant, or of every tenant; oldest first."""
        stmt = _key_records().order_by(ApiKey.created_at, ApiKey.id)
        async with self._session() as session:
            if tenant_name is not None:
                tenant_id = (
                    await session.execute(
                        select(Tenant.id).where(Tenant.name == tenant_name, Tenant.deleted_at.is_(None))
                    )
                ).scalar_one_or_none()
                if tenant_id is None:
                    raise NotFoundError(f"tenant '{str(tenant_name)[:100]}' not found", param="tenant")
                stmt = stmt.where(ApiKey.tenant_id == tenant_id)
            rows = (await session.execute(stmt)).all()
        return [_key_record(r) for r in rows]

    async def lookup(self, key_hash: str) -> Credential | None:
        """The credential for a key hash; None if unknown, revoked, or its tenant is deleted.

        Expiry is not checked here: ``expires_at`` is returned for the caller (and its cache).
        """
        if not isinstance(key_hash, str) or _KEY_HASH_RE.fullmatch(key_hash) is None:
            return None
        stmt = (
            select(ApiKey.id, ApiKey.tenant_id, Tenant.name, ApiKey.role, ApiKey.expires_at)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None), Tenant.deleted_at.is_(None))
        )
        async with self._session() as session:
            row = (await session.execute(stmt)).one_or_none()
        if row is None:
            return None
        key_id, tenant_id, tenant_name, role, expires_at = row
        return Credential(
            key_id=key_id,
            key_hash=key_hash,
            tenant_id=tenant_id,
            tenant_name=tenant_name,
            role=role,
            expires_at=expires_at,
        )

    async def revoked_since(self, since: datetime) -> builtins.list[str]:
        """Hashes of keys revoked at or after ``since`` (tenant deletion included).

        ``revoked_at`` is the revoking process's clock at the revoke, which commits a moment
        later: pollers should overlap their windows (e.g. pass the previous poll's start minus
        a few seconds) rather than pass exactly the previous poll's time.
        """
        since = _require_aware(since, "since")
        stmt = select(ApiKey.key_hash).where(ApiKey.revoked_at >= since).order_by(ApiKey.revoked_at)
        async with self._session() as session:
            return builtins.list((await session.execute(stmt)).scalars().all())


class Store:
    """The state store: one engine and the repositories over it.

    ``conversations``, ``responses`` and ``keyring`` (tenant-private data, encrypted at rest)
    exist only when a :class:`~skyfleet.crypto.KeyProvider` is given.
    """

    def __init__(
        self, engine: AsyncEngine, *, key_provider: KeyProvider | None = None, clock: Clock | None = None
    ) -> None:
        self.engine = engine
        self.tenants = TenantRepository(engine)
        self.keys = ApiKeyRepository(engine)
        self._keyring: TenantKeyring | None = None
        self._conversations: ConversationRepository | None = None
        self._responses: ResponseRepository | None = None
        if key_provider is not None:
            from skyfleet.crypto import TenantKeyring
            from skyfleet.state.conversations import ConversationRepository, ResponseRepository

            clock = clock or SystemClock()
            self._keyring = TenantKeyring(engine, key_provider, clock)
            self._conversations = ConversationRepository(engine, self._keyring, clock)
            self._responses = ResponseRepository(engine, self._keyring, clock)

    @property
    def keyring(self) -> TenantKeyring:
        return self._require(self._keyring)

    @property
    def conversations(self) -> ConversationRepository:
        return self._require(self._conversations)

    @property
    def responses(self) -> ResponseRepository:
        return self._require(self._responses)

    @staticmethod
    def _require(repository: _T | None) -> _T:
        if repository is None:
            raise ConfigError(
                "conversations and stored responses need encryption keys: open the store with "
                "Store.open(url, key_provider=LocalKeyProvider.open(path))"
            )
        return repository

    @classmethod
    async def open(
        cls, url: str, *, key_provider: KeyProvider | None = None, clock: Clock | None = None
    ) -> Store:
        """Connect to ``url``, migrate the schema to the newest revision, and return the store."""
        engine = make_engine(url)
        try:
            await migrate(engine)
        except Exception as exc:
            await engine.dispose()
            detail = str(getattr(exc, "orig", None) or exc)[:300]
            raise ServiceUnavailableError(
                f"cannot open the state store: {type(exc).__name__}: {detail}"
            ) from exc
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, key_provider=key_provider, clock=clock)

    async def close(self) -> None:
        if self._keyring is not None:
            self._keyring.forget()
        await self.engine.dispose()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Whether the database answers ``SELECT 1`` within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - readiness: any failure means "not ready"
            return False
        return True
