"""Re-encrypting a tenant's records under its newest data key (``skyfleet keys rotate-dek``).

Every sealed record names the DEK version that sealed it (bytes 1-4 of the cipher's v1 frame,
big-endian, so ``substr(ct, 2, 4) < target`` finds the older ones in SQL on SQLite and
PostgreSQL alike). A pass walks each sealed column of the tenant in primary-key order, in
batches, decrypts each older record and seals the same plaintext again under the target version
(same AAD), and writes it back with a compare-and-set on the record's header and nonce: a record
rewritten meanwhile by a request is left alone (a conflict) and picked up by the next pass if it
is still old. So nothing a concurrent writer stores is lost, a pass can stop anywhere, and
running again resumes where it stopped (records already under the target are skipped).

:func:`rotate_dek`: start a new DEK version (new records use it at once in this process, within
the keyring's ``current_ttl_s`` (5 s) in every other process), re-encrypt, and with
``retire_old`` wait ``settle_s`` (longer than ``current_ttl_s``, so no process still seals with an
old version), run a last pass and destroy the older DEK versions.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, and_, func, select, tuple_, update

from skyfleet.crypto.cipher import DataCipher, record_aad
from skyfleet.crypto.errors import DecryptionError
from skyfleet.crypto.keyring import TenantKeyring
from skyfleet.errors import ConflictError, InvalidRequestError
from skyfleet.state.access import Database, SessionSource
from skyfleet.state.models import Base, Conversation, ConversationItem, ResponseItem, StoredResponse
from skyfleet.state.vault import (
    KIND_CONVERSATION,
    KIND_CONVERSATION_ITEM,
    KIND_RESPONSE,
    KIND_RESPONSE_ITEM,
    item_record_id,
)

DEFAULT_BATCH = 200
DEFAULT_SETTLE_S = 15.0
_VERSION = struct.Struct(">I")
#: Format byte, DEK version and nonce: what identifies one sealing of a record.
_SEALING_PREFIX = 1 + 4 + 12


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """A column of ciphertexts: its table, the record kind and record id in its AAD, its primary key."""

    model: type[Base]
    column: str
    kind: str
    key: tuple[str, ...]
    record_id: Callable[[Any], str]


#: Every ``*_ct`` column (tests check that none is missing).
SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(Conversation, "metadata_ct", KIND_CONVERSATION, ("id",), lambda r: r.id),
    SealedColumn(
        ConversationItem, "item_ct", KIND_CONVERSATION_ITEM, ("conversation_id", "seq"),
        lambda r: item_record_id(r.conversation_id, r.id),
    ),
    SealedColumn(StoredResponse, "body_ct", KIND_RESPONSE, ("id",), lambda r: r.id),
    SealedColumn(
        ResponseItem, "item_ct", KIND_RESPONSE_ITEM, ("response_id", "seq"),
        lambda r: item_record_id(r.response_id, r.id),
    ),
)


@dataclass(frozen=True, slots=True)
class ReencryptProgress:
    """Pass ``pass_no``: ``done`` of the ``total`` older records found at its start looked at."""

    pass_no: int
    total: int
    done: int
    reencrypted: int
    conflicts: int
    failed: int


@dataclass(frozen=True, slots=True)
class ReencryptReport:
    tenant_id: str
    target_version: int
    reencrypted: int
    #: Records rewritten by a request while being re-encrypted (left to the request, re-checked).
    conflicts: int
    #: Records that could not be decrypted (left as they are).
    failed: int
    #: Records still sealed with an older version at the end.
    remaining: int
    passes: int
    #: Older DEK versions destroyed (``retire_old``).
    retired: tuple[int, ...] = ()


def _older(col: SealedColumn, target: int) -> ColumnElement[bool]:
    ct = getattr(col.model, col.column)
    return func.substr(ct, 2, 4, type_=LargeBinary) < _VERSION.pack(target)


async def count_older(source: SessionSource, tenant_id: str, target: int) -> int:
    """How many of the tenant's records are sealed with a DEK version older than ``target``."""
    db = Database(source)
    total = 0
    async with db.session() as session:
        for col in SEALED_COLUMNS:
            stmt = select(func.count()).select_from(col.model).where(
                col.model.tenant_id == tenant_id, _older(col, target)  # type: ignore[attr-defined]
            )
            total += int((await session.execute(stmt)).scalar_one())
    return total


class _Pass:
    """One pass over the tenant's sealed columns."""

    def __init__(self, db: Database, keyring: TenantKeyring, tenant_id: str, target: int, dek: bytes,
                 *, batch_size: int, pause_s: float, pass_no: int, total: int,
                 progress: Callable[[ReencryptProgress], None] | None) -> None:
        self.db, self.keyring, self.tenant_id, self.target, self.dek = db, keyring, tenant_id, target, dek
        self.batch_size, self.pause_s, self.pass_no, self.total = batch_size, pause_s, pass_no, total
        self.progress = progress
        self.done = self.reencrypted = self.conflicts = self.failed = 0

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(ReencryptProgress(self.pass_no, self.total, self.done, self.reencrypted,
                                            self.conflicts, self.failed))

    async def run(self) -> None:
        for col in SEALED_COLUMNS:
            # A pass covers the records that were old when it reached the column: records written
            # under an old version meanwhile (a gateway that has not seen the new version yet) go
            # to the next pass, so a steady writer cannot keep one pass going forever.
            budget = await self._older_count(col)
            after: tuple[Any, ...] | None = None
            seen = 0
            while seen < budget:
                before = self.done
                after = await self._batch(col, after)
                seen += self.done - before
                if after is None:
                    break
                if self.pause_s > 0:
                    await asyncio.sleep(self.pause_s)

    async def _older_count(self, col: SealedColumn) -> int:
        model = col.model
        stmt = select(func.count()).select_from(model).where(
            model.tenant_id == self.tenant_id, _older(col, self.target))  # type: ignore[attr-defined]
        async with self.db.session() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def _batch(self, col: SealedColumn, after: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """Re-encrypt the next batch after key ``after``; the last key seen, None when done."""
        model = col.model
        keys = [getattr(model, k) for k in col.key]
        ct = getattr(model, col.column)
        wanted = [*keys, ct]
        if "id" not in col.key:  # item records: the AAD names the item id too
            wanted.append(model.id)  # type: ignore[attr-defined]
        stmt = select(*wanted).where(model.tenant_id == self.tenant_id, _older(col, self.target))  # type: ignore[attr-defined]
        if after is not None:
            stmt = stmt.where(tuple_(*keys) > tuple_(*after))
        stmt = stmt.order_by(*keys).limit(self.batch_size)
        async with self.db.session() as session:
            rows = (await session.execute(stmt)).all()
        if not rows:
            return None
        changes: list[tuple[tuple[Any, ...], bytes, bytes]] = []
        for row in rows:
            blob = bytes(getattr(row, col.column))
            aad = record_aad(self.tenant_id, col.kind, col.record_id(row))
            try:
                old = await self.keyring.data_key_version(self.tenant_id, DataCipher.key_version(blob))
                plaintext = DataCipher.decrypt(old, blob, aad)
            except DecryptionError:
                self.failed += 1
                continue
            sealed = DataCipher.encrypt(self.dek, plaintext, aad, key_version=self.target)
            changes.append((tuple(getattr(row, k) for k in col.key), blob[:_SEALING_PREFIX], sealed))
        if changes:
            async with self.db.session(write=True) as session:
                for key_values, prefix, sealed in changes:
                    stmt_u = (
                        update(model)
                        .where(
                            and_(*(k == v for k, v in zip(keys, key_values, strict=True))),
                            model.tenant_id == self.tenant_id,  # type: ignore[attr-defined]
                            func.substr(ct, 1, _SEALING_PREFIX, type_=LargeBinary) == prefix,
                        )
                        .values({col.column: sealed})
                        .execution_options(synchronize_session=False)
                    )
                    if (await session.execute(stmt_u)).rowcount:
                        self.reencrypted += 1
                    else:
                        self.conflicts += 1
        self.done += len(rows)
        self._report()
        last = rows[-1]
        return tuple(getattr(last, k) for k in col.key)


async def reencrypt_tenant(
    source: SessionSource,
    keyring: TenantKeyring,
    tenant_id: str,
    *,
    target: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_passes: int = 10,
    pause_s: float = 0.0,
    progress: Callable[[ReencryptProgress], None] | None = None,
) -> ReencryptReport:
    """Re-encrypt the tenant's records sealed with versions older than ``target`` (default: the
    current version) in passes, until none is left, only undecryptable ones are, or ``max_passes``."""
    if not 1 <= batch_size <= 10_000:
        raise InvalidRequestError("batch_size must be from 1 to 10000", param="batch_size")
    db = Database(source)
    if target is None:
        target, dek = await keyring.data_key(tenant_id, fresh=True)
    else:
        dek = await keyring.data_key_version(tenant_id, target)
    reencrypted = conflicts = failed = passes = 0
    remaining = await count_older(source, tenant_id, target)
    while remaining and passes < max_passes:
        passes += 1
        one = _Pass(db, keyring, tenant_id, target, dek, batch_size=batch_size, pause_s=pause_s,
                    pass_no=passes, total=remaining, progress=progress)
        await one.run()
        reencrypted += one.reencrypted
        conflicts += one.conflicts
        failed = one.failed  # the same records fail in every pass: count them once
        remaining = await count_older(source, tenant_id, target)
        if remaining <= one.failed:
            break
    return ReencryptReport(tenant_id, target, reencrypted, conflicts, failed, remaining, passes)


async def rotate_dek(
    source: SessionSource,
    keyring: TenantKeyring,
    tenant_id: str,
    *,
    new_version: bool = True,
    retire_old: bool = False,
    settle_s: float = DEFAULT_SETTLE_S,
    batch_size: int = DEFAULT_BATCH,
    pause_s: float = 0.0,
    progress: Callable[[ReencryptProgress], None] | None = None,
) -> ReencryptReport:
    """Start a new DEK version for the tenant (unless ``new_version`` is False: resume), re-encrypt
    its records under it and, with ``retire_old``, destroy the older versions (see the module doc).

    :class:`ConflictError` if ``retire_old`` is asked but records under older versions remain
    (nothing is destroyed then).
    """
    if new_version:
        target = await keyring.rotate(tenant_id)
    else:
        target, _ = await keyring.data_key(tenant_id, fresh=True)
    report = await reencrypt_tenant(source, keyring, tenant_id, target=target, batch_size=batch_size,
                                    pause_s=pause_s, progress=progress)
    if not retire_old:
        return report
    created = await keyring.created_at(tenant_id, target)
    if created is not None and (wait := created.timestamp() + settle_s - keyring.clock.wall()) > 0:
        await asyncio.sleep(wait)
    last = await reencrypt_tenant(source, keyring, tenant_id, target=target, batch_size=batch_size,
                                  pause_s=pause_s, progress=progress)
    report = ReencryptReport(
        tenant_id, target, report.reencrypted + last.reencrypted, report.conflicts + last.conflicts,
        last.failed, last.remaining, report.passes + last.passes,
    )
    if report.remaining:
        raise ConflictError(
            f"{report.remaining} records are still sealed with an older data key ({report.failed} could not "
            "be decrypted): nothing was destroyed"
        )
    retired = await keyring.retire(tenant_id, below=target)
    return ReencryptReport(tenant_id, target, report.reencrypted, report.conflicts, report.failed, 0,
                           report.passes, tuple(retired))
