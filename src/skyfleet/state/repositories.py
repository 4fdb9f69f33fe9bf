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
from skyfleet.iam.authz import ROLES as ROLES
from skyfleet.state.db import WRITE_OPTIONS, make_engine, make_session_factory, migrate
from skyfleet.state.key_fields import (
    KEY_FIELDS,
    TENANT_FIELDS,
    check_cidrs,
    check_key_name,
    check_limit,
    check_models,
    check_retention,
    check_role,
    from_json_list,
    json_list,
)
from skyfleet.state.models import KEY_ID_PREFIX, TENANT_ID_PREFIX, ApiKey, Tenant, new_id, utcnow

if TYPE_CHECKING:  # runtime imports are deferred: skyfleet.crypto imports this package
    from skyfleet.crypto import KeyProvider, TenantKeyring
    from skyfleet.state.conversations import ConversationRepository, ResponseRepository

TENANT_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"

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
    #: Requests and tokens per minute for the whole tenant; None: the configured default.
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    #: Opted in to sharing the public (system-prompt) prefix cache.
    share_public_prefix: bool = False


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
    #: Allowed models / client networks (canonical CIDRs); None: unrestricted.
    models: tuple[str, ...] | None = None
    cidrs: tuple[str, ...] | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """What authentication needs about a key; never holds the plaintext key."""

    key_id: str
    key_hash: str
    tenant_id: str
    tenant_name: str
    role: str
    expires_at: datetime | None
    models: frozenset[str] | None = None
    #: Canonical CIDRs the key may be used from; None: anywhere.
    cidrs: tuple[str, ...] | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    tenant_rpm_limit: int | None = None
    tenant_tpm_limit: int | None = None
    share_public_prefix: bool = False


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
        return await self.update(name, {"retention_days": days})

    async def update(self, name: str, changes: dict[str, Any]) -> TenantRecord:
        """Change some of :data:`TENANT_FIELDS` (a None limit or retention: the default / no limit)."""
        unknown = sorted(set(changes) - TENANT_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unknown tenant field '{unknown[0]}'", param=unknown[0])
        values: dict[str, Any] = {}
        for field_name, value in changes.items():
            if field_name == "retention_days":
                values[field_name] = check_retention(value)
            elif field_name == "share_public_prefix":
                if not isinstance(value, bool):
                    raise InvalidRequestError("share_public_prefix must be true or false", param=field_name)
                values[field_name] = value
            else:
                values[field_name] = check_limit(value, field_name)
        if not values:
            return await self.get(name)
        values["changed_at"] = utcnow()
        async with self._session(write=True) as session:
            row = (
                await session.execute(
                    update(Tenant)
                    .where(Tenant.name == name, Tenant.deleted_at.is_(None))
                    .values(**values)
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
        id=row.id, name=row.name, created_at=row.created_at, retention_days=row.retention_days,
        rpm_limit=row.rpm_limit, tpm_limit=row.tpm_limit, share_public_prefix=bool(row.share_public_prefix),
    )


def _live_tenant(name: str) -> Select[Tenant]:
    return select(Tenant).where(Tenant.name == name, Tenant.deleted_at.is_(None))


def _key_records() -> Select[Any]:
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
        ApiKey.models,
        ApiKey.cidrs,
        ApiKey.rpm_limit,
        ApiKey.tpm_limit,
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
        models=from_json_list(row.models),
        cidrs=from_json_list(row.cidrs),
        rpm_limit=row.rpm_limit,
        tpm_limit=row.tpm_limit,
    )


def _key_guard(stmt: Any, tenant_id: str | None, roles: builtins.list[str] | None) -> Any:
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    if roles is not None:
        stmt = stmt.where(ApiKey.role.in_(roles))
    return stmt


class ApiKeyRepository(_Repository):
    async def create(
        self,
        tenant_name: str,
        *,
        role: str = "member",
        name: str | None = None,
        expires_at: datetime | None = None,
        models: builtins.list[str] | tuple[str, ...] | None = None,
        cidrs: builtins.list[str] | tuple[str, ...] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key for a live tenant. Returns the plaintext key: the only time it exists.

        ``models`` / ``cidrs``: allow-lists (None: unrestricted); ``rpm_limit`` / ``tpm_limit``:
        this key's own per-minute limits, on top of its tenant's.
        """
        role = check_role(role)
        name = check_key_name(name)
        if expires_at is not None:
            expires_at = _require_aware(expires_at, "expires_at")
        models_t, cidrs_t = check_models(models), check_cidrs(cidrs)
        rpm_limit, tpm_limit = check_limit(rpm_limit, "rpm_limit"), check_limit(tpm_limit, "tpm_limit")
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
                models=json_list(models_t),
                cidrs=json_list(cidrs_t),
                rpm_limit=rpm_limit,
                tpm_limit=tpm_limit,
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
            models=models_t,
            cidrs=cidrs_t,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
        )
        return key, record

    async def get(self, key_id: str) -> KeyRecord:
        """One key (revoked or not) by id; NotFoundError if there is none."""
        if isinstance(key_id, str) and len(key_id) <= 64:
            async with self._session() as session:
                row = (await session.execute(_key_records().where(ApiKey.id == key_id))).one_or_none()
            if row is not None:
                return _key_record(row)
        raise NotFoundError(f"API key '{str(key_id)[:100]}' not found", param="key_id")

    async def update(
        self,
        key_id: str,
        changes: dict[str, Any],
        *,
        tenant_id: str | None = None,
        roles: builtins.list[str] | None = None,
    ) -> KeyRecord:
        """Change some of :data:`KEY_FIELDS` of a live (unrevoked) key.

        ``tenant_id`` / ``roles`` guard the change in the same statement: a key of another tenant,
        or whose current role is not in ``roles``, is not found (so a check-then-act race cannot
        change a key the caller was not allowed to touch). Gateways pick the change up when their
        auth cache entry expires (``auth_cache_ttl_s``); restrictions apply at once on this one
        only if the caller evicts (the admin route does).
        """
        unknown = sorted(set(changes) - KEY_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unknown key field '{unknown[0]}'", param=unknown[0])
        checks = {"name": check_key_name, "role": check_role, "models": lambda v: json_list(check_models(v)),
                  "cidrs": lambda v: json_list(check_cidrs(v)),
                  "expires_at": lambda v: None if v is None else _require_aware(v, "expires_at"),
                  "rpm_limit": lambda v: check_limit(v, "rpm_limit"),
                  "tpm_limit": lambda v: check_limit(v, "tpm_limit")}
        values = {f: checks[f](v) for f, v in changes.items()}
        if values:
            values["changed_at"] = utcnow()
        found = _key_guard(_key_records().where(ApiKey.id == key_id), tenant_id, roles)
        async with self._session(write=True) as session:
            if values:
                await session.execute(
                    _key_guard(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)),
                               tenant_id, roles)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
            row = (await session.execute(found)).one_or_none()
            if row is None:
                raise NotFoundError(f"API key '{str(key_id)[:100]}' not found", param="key_id")
            if row.revoked_at is not None:
                raise InvalidRequestError("a revoked key cannot be changed", param="key_id")
        return _key_record(row)

    async def revoke(
        self, key_id: str, *, tenant_id: str | None = None, roles: builtins.list[str] | None = None
    ) -> KeyRecord:
        """Revoke a key. Idempotent: a second revoke keeps the first ``revoked_at``.

        ``tenant_id`` / ``roles``: as in :meth:`update`.
        """
        async with self._session(write=True) as session:
            await session.execute(
                _key_guard(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)), tenant_id, roles)
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            row = (
                await session.execute(_key_guard(_key_records().where(ApiKey.id == key_id), tenant_id, roles))
            ).one_or_none()
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
            select(ApiKey.id, ApiKey.tenant_id, Tenant.name, ApiKey.role, ApiKey.expires_at, ApiKey.models,
                   ApiKey.cidrs, ApiKey.rpm_limit, ApiKey.tpm_limit, Tenant.rpm_limit.label("tenant_rpm"),
                   Tenant.tpm_limit.label("tenant_tpm"), Tenant.share_public_prefix)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None), Tenant.deleted_at.is_(None))
        )
        async with self._session() as session:
            row = (await session.execute(stmt)).one_or_none()
        if row is None:
            return None
        models = from_json_list(row.models)
        return Credential(
            key_id=row.id,
            key_hash=key_hash,
            tenant_id=row.tenant_id,
            tenant_name=row.name,
            role=row.role,
            expires_at=row.expires_at,
            models=None if models is None else frozenset(models),
            cidrs=from_json_list(row.cidrs),
            rpm_limit=row.rpm_limit,
            tpm_limit=row.tpm_limit,
            tenant_rpm_limit=row.tenant_rpm,
            tenant_tpm_limit=row.tenant_tpm,
            share_public_prefix=bool(row.share_public_prefix),
        )

    async def revoked_since(self, since: datetime) -> builtins.list[str]:
        """Hashes of keys revoked or changed at or after ``since``, or whose tenant changed or was deleted.

        A gateway drops these from its credential cache, so a revocation, a role demotion or a
        tightened restriction or limit takes effect everywhere within one poll. The times are the
        writing process's clock, which commits a moment later: pollers should overlap their windows
        (e.g. pass the previous poll's start minus a few seconds).
        """
        since = _require_aware(since, "since")
        changed_tenants = select(Tenant.id).where((Tenant.changed_at >= since) | (Tenant.deleted_at >= since))
        stmt = select(ApiKey.key_hash).where(
            (ApiKey.revoked_at >= since) | (ApiKey.changed_at >= since) | ApiKey.tenant_id.in_(changed_tenants))
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
