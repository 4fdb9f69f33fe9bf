"""KEK rotation with no downtime (``skyfleet keys rotate-kek``).

1. The provider starts a new KEK version (local: a new master record in the key file; KMS:
   ``RotateKeyOnDemand`` per tenant key; Vault: ``rotate`` per tenant key). Old versions still
   unwrap, so every process keeps reading and writing throughout.
2. Every stored wrapped DEK (``tenant_keys``) is rewrapped under the current version and written
   back with a compare-and-set (only if the row still holds the blob that was read), so a
   concurrent shred or a concurrent rewrap is never overwritten. The DEKs themselves do not
   change: no record is re-encrypted and cached DEKs stay valid.
3. Verification passes rewrap what is still under an old version (a DEK another process created
   with the old KEK while step 2 ran) until none is left.
4. ``retire_old``: after ``settle_s`` (so that a wrap another process started before step 1 has
   landed in the database), a last pass, then the provider retires the old versions (local:
   removed from the key file; Vault: ``min_decryption_version``; KMS: nothing to do).

Each step is idempotent: an interrupted rotation is finished by running it again (a second run
rotates once more, which is harmless).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update

from skyfleet.clock import Clock, SystemClock
from skyfleet.crypto.errors import DecryptionError
from skyfleet.crypto.providers.base import RotatingKeyProvider
from skyfleet.errors import ConflictError
from skyfleet.state.access import Database, SessionSource
from skyfleet.state.models import TenantKey

#: How long a rotation waits before retiring the old KEK versions, by default.
DEFAULT_SETTLE_S = 15.0


@dataclass(frozen=True, slots=True)
class KekProgress:
    """Where a rotation is: ``done`` of ``total`` wrapped DEKs looked at in pass ``pass_no``."""

    pass_no: int
    total: int
    done: int


@dataclass(frozen=True, slots=True)
class KekRotationReport:
    provider: str
    tenants: int
    #: Tenant KEKs that got new key material (local: all of them, through one new master key).
    rotated: int
    rewrapped: int
    #: Wrapped DEKs that could not be unwrapped (for example a tenant shredded meanwhile).
    failed: int
    #: Wrapped DEKs still under an old KEK version when the rotation ended.
    stale: int
    passes: int
    retired: bool


async def _rows(db: Database, provider: str, tenant_ids: list[str] | None = None) -> list[tuple[str, int, bytes]]:
    stmt = select(TenantKey.tenant_id, TenantKey.version, TenantKey.wrapped_dek).where(TenantKey.provider == provider)
    if tenant_ids is not None:
        stmt = stmt.where(TenantKey.tenant_id.in_(tenant_ids))
    async with db.session() as session:
        rows = (await session.execute(stmt.order_by(TenantKey.tenant_id, TenantKey.version))).all()
    return [(r[0], r[1], bytes(r[2])) for r in rows]


async def _store(db: Database, tenant_id: str, version: int, old: bytes, new: bytes) -> bool:
    """Replace the wrapped DEK if it is still ``old``; whether it was replaced."""
    stmt = (
        update(TenantKey)
        .where(TenantKey.tenant_id == tenant_id, TenantKey.version == version, TenantKey.wrapped_dek == old)
        .values(wrapped_dek=new)
        .execution_options(synchronize_session=False)
    )
    async with db.session(write=True) as session:
        return bool((await session.execute(stmt)).rowcount)


async def _stale(provider: RotatingKeyProvider, rows: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
    """The rows whose blob names a KEK version other than the tenant's current one."""
    current: dict[str, int | None] = {}
    out = []
    for tenant_id, version, blob in rows:
        if tenant_id not in current:
            current[tenant_id] = await provider.current_kek_version(tenant_id)
        want, have = current[tenant_id], provider.kek_version(blob)
        if want is not None and have != want:
            out.append((tenant_id, version, blob))
    return out


async def rotate_kek(
    source: SessionSource,
    provider: RotatingKeyProvider,
    *,
    retire_old: bool = False,
    settle_s: float = DEFAULT_SETTLE_S,
    max_passes: int = 5,
    progress: Callable[[KekProgress], None] | None = None,
    clock: Clock | None = None,
) -> KekRotationReport:
    """Rotate the provider's KEKs and rewrap every stored DEK under them (see the module doc).

    :class:`ConflictError` if ``retire_old`` is asked but some wrapped DEK could not be moved off
    the old versions (nothing is retired then).
    """
    if not isinstance(provider, RotatingKeyProvider):
        raise TypeError(f"key provider {provider.name!r} cannot rotate its keys")
    db = Database(source)
    clock = clock or SystemClock()
    rows = await _rows(db, provider.name)
    tenants = sorted({r[0] for r in rows})
    rotated = await provider.rotate_kek(tenants)
    started = clock.now()
    rewrapped = 0
    failed: set[tuple[str, int]] = set()

    async def rewrap_all(pass_no: int, todo: list[tuple[str, int, bytes]]) -> None:
        nonlocal rewrapped
        for index, (tenant_id, version, blob) in enumerate(todo):
            try:
                new = await provider.rewrap(blob, tenant_id=tenant_id)
            except DecryptionError:
                failed.add((tenant_id, version))
            else:
                if new != blob and await _store(db, tenant_id, version, blob, new):
                    rewrapped += 1
            if progress is not None:
                progress(KekProgress(pass_no, len(todo), index + 1))

    async def still_stale() -> list[tuple[str, int, bytes]]:
        return await _stale(provider, await _rows(db, provider.name))

    def movable(rows: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
        return [r for r in rows if (r[0], r[1]) not in failed]

    await rewrap_all(1, rows)
    passes = 1
    stale = await still_stale()
    while movable(stale) and passes < max_passes:
        passes += 1
        await rewrap_all(passes, movable(stale))
        stale = await still_stale()
    retired = False
    if retire_old:
        if (wait := started + settle_s - clock.now()) > 0:
            await asyncio.sleep(wait)
        tenants = sorted({r[0] for r in await _rows(db, provider.name)})
        stale = await still_stale()
        if movable(stale):
            passes += 1
            await rewrap_all(passes, movable(stale))
            stale = await still_stale()
        if stale:
            raise ConflictError(
                f"{len(stale)} wrapped data keys are still under an old key-encryption key: nothing was "
                "retired; run the rotation again"
            )
        await provider.retire_old_keks(tenants)
        retired = True
    return KekRotationReport(
        provider=provider.name,
        tenants=len(tenants),
        rotated=rotated,
        rewrapped=rewrapped,
        failed=len(failed),
        stale=len(stale),
        passes=passes,
        retired=retired,
    )
