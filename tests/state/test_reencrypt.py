"""DEK rotation (skyfleet keys rotate-dek) on real SQLite and PostgreSQL: every record re-encrypted
under the new version, concurrent writes kept, other tenants untouched, resumable, retirement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text, update

from skyfleet.clock import ManualClock
from skyfleet.crypto import LocalKeyProvider, TenantKeyring
from skyfleet.errors import ConflictError
from skyfleet.state import Store
from skyfleet.state.conversations import ConversationRepository, ResponseRepository
from skyfleet.state.models import Base, Conversation
from skyfleet.state.reencrypt import (
    SEALED_COLUMNS,
    ReencryptProgress,
    count_older,
    reencrypt_tenant,
    rotate_dek,
)

from .rotation_helpers import dek_versions, message, plaintexts, populate, sealed_blobs


def fresh_repositories(store: Store, provider: LocalKeyProvider) -> tuple[ConversationRepository, ResponseRepository]:
    """Repositories over a keyring with nothing cached (as a newly started gateway)."""
    keyring = TenantKeyring(store.engine, provider, ManualClock())
    return ConversationRepository(store.engine, keyring), ResponseRepository(store.engine, keyring)


def test_every_ciphertext_column_is_covered() -> None:
    columns = {(t.name, c.name) for t in Base.metadata.tables.values() for c in t.columns if c.name.endswith("_ct")}
    assert columns == {(s.model.__tablename__, s.column) for s in SEALED_COLUMNS}


async def test_rotate_dek_reencrypts_every_record_and_retires_the_old_key(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, globex = tenant_ids
    await populate(secure_store, acme, "acme")
    await populate(secure_store, globex, "globex")
    before = await plaintexts(secure_store, *fresh_repositories(secure_store, key_provider), acme)
    globex_blobs = await sealed_blobs(secure_store, globex)
    total = sum((await dek_versions(secure_store, acme)).values())
    assert await dek_versions(secure_store, acme) == {1: total}

    seen: list[Any] = []
    report = await rotate_dek(secure_store.engine, secure_store.keyring, acme, retire_old=True, settle_s=0,
                              batch_size=4, progress=seen.append)
    assert (report.target_version, report.reencrypted, report.failed, report.remaining) == (2, total, 0, 0)
    assert report.retired == (1,)
    assert seen and seen[-1].done == total and seen[-1].total == total
    assert await dek_versions(secure_store, acme) == {2: total}
    assert await secure_store.keyring.versions(acme) == [2]
    assert await plaintexts(secure_store, *fresh_repositories(secure_store, key_provider), acme) == before
    assert await sealed_blobs(secure_store, globex) == globex_blobs  # other tenants untouched
    assert await secure_store.keyring.versions(globex) == [1]
    # New records use the new version; running it again finds nothing to do.
    await secure_store.conversations.create(acme, metadata={"after": "rotation"})
    assert await dek_versions(secure_store, acme) == {2: total + 1}
    again = await rotate_dek(secure_store.engine, secure_store.keyring, acme, new_version=False)
    assert (again.target_version, again.reencrypted, again.passes) == (2, 0, 0)


async def test_concurrent_writes_during_reencryption_are_not_lost(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, _ = tenant_ids
    await populate(secure_store, acme, "acme", conversations=3, items=10)
    conv_ids = [c for c in await plaintexts(secure_store, *fresh_repositories(secure_store, key_provider), acme)
                if c.startswith("conv_")]
    # A second gateway whose keyring still believes version 1 is current: it writes under version 1
    # throughout the first pass, and follows the rotation (its current_ttl_s runs out) once the
    # second pass starts, as every gateway does within seconds. A writer that never followed would
    # add old records as fast as the passes re-encrypt them: every pass would find more to do than
    # the one before, and the rotation would only end at max_passes, after minutes on a slow machine.
    stale_clock = ManualClock()
    stale_keyring = TenantKeyring(secure_store.engine, key_provider, stale_clock)
    await stale_keyring.data_key(acme)
    stale = ConversationRepository(secure_store.engine, stale_keyring)
    # A third one that has not seen the rotation yet when it ends (its clock stands still).
    lagging_keyring = TenantKeyring(secure_store.engine, key_provider, ManualClock())
    await lagging_keyring.data_key(acme)
    lagging = ConversationRepository(secure_store.engine, lagging_keyring)
    live = secure_store.conversations
    expected_meta: dict[str, dict[str, str]] = {}
    added: dict[str, list[str]] = {c: [] for c in conv_ids}
    initially = {c: len(await live.all_items(acme, c)) for c in conv_ids}
    stop = asyncio.Event()
    failures: list[BaseException] = []

    async def writer(repo: ConversationRepository, name: str) -> None:
        n = 0
        try:
            while not stop.is_set():
                cid = conv_ids[n % len(conv_ids)]
                meta = {"writer": name, "n": str(n)}
                await repo.update_metadata(acme, cid, meta)
                expected_meta[cid] = meta
                [item] = await repo.add_items(acme, cid, [message(f"{name} {n}")])
                added[cid].append(item.id)
                n += 1
                await asyncio.sleep(0)
        except BaseException as exc:
            failures.append(exc)

    followed: list[int] = []

    def follow_in_pass_two(progress: ReencryptProgress) -> None:
        if progress.pass_no >= 2 and not followed:
            stale_clock.advance(stale_keyring.current_ttl_s)  # its belief in version 1 expires
            followed.append(progress.pass_no)

    tasks = [asyncio.create_task(writer(live, "live")), asyncio.create_task(writer(stale, "stale"))]
    try:
        report = await rotate_dek(secure_store.engine, secure_store.keyring, acme, batch_size=3,
                                  progress=follow_in_pass_two)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert failures == []
    assert report.target_version == 2 and report.reencrypted > 0
    # The lagging gateway writes under version 1 after the passes; the last pass picks it up.
    await lagging.update_metadata(acme, conv_ids[0], {"writer": "stale", "n": "last"})
    expected_meta[conv_ids[0]] = {"writer": "stale", "n": "last"}
    assert await count_older(secure_store.engine, acme, 2) >= 1
    final = await rotate_dek(secure_store.engine, secure_store.keyring, acme, new_version=False, retire_old=True,
                             settle_s=0)
    assert final.remaining == 0 and final.retired == (1,)
    assert set(await dek_versions(secure_store, acme)) == {2}
    conversations, _ = fresh_repositories(secure_store, key_provider)
    for cid in conv_ids:
        record = await conversations.get(acme, cid)
        assert record.metadata == expected_meta[cid]
        ids = [i.id for i in await conversations.all_items(acme, cid)]
        assert set(added[cid]) <= set(ids) and len(ids) == initially[cid] + len(added[cid])


async def test_a_record_rewritten_between_read_and_write_keeps_the_new_value(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme, metadata={"v": "old"})
    stale_keyring = TenantKeyring(secure_store.engine, key_provider, ManualClock())
    await stale_keyring.data_key(acme)  # this gateway believes version 1 is current
    stale = ConversationRepository(secure_store.engine, stale_keyring)
    assert await secure_store.keyring.rotate(acme) == 2

    class Interfering(TenantKeyring):
        """Lets a request rewrite the record after the pass read it and before it writes it back."""

        interfered = False

        async def data_key_version(self, tenant_id: str, version: int) -> bytes:
            if version == 1 and not self.interfered:  # the pass is about to open the record
                self.interfered = True
                await stale.update_metadata(acme, conv.id, {"v": "new"})  # sealed with version 1
            return await super().data_key_version(tenant_id, version)

    keyring = Interfering(secure_store.engine, key_provider, ManualClock())
    report = await reencrypt_tenant(secure_store.engine, keyring, acme, target=2)
    assert keyring.interfered and (report.conflicts, report.reencrypted, report.passes) == (1, 1, 2)
    assert await dek_versions(secure_store, acme) == {2: 1}
    conversations, _ = fresh_repositories(secure_store, key_provider)
    assert (await conversations.get(acme, conv.id)).metadata == {"v": "new"}


async def test_an_interrupted_reencryption_resumes(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, _ = tenant_ids
    await populate(secure_store, acme, "acme", conversations=3)
    total = sum((await dek_versions(secure_store, acme)).values())

    class Interrupted(Exception):
        pass

    def crash(progress: Any) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        await rotate_dek(secure_store.engine, secure_store.keyring, acme, batch_size=2, progress=crash)
    counts = await dek_versions(secure_store, acme)
    assert counts == {1: total - 2, 2: 2}  # one batch landed
    resumed = await rotate_dek(secure_store.engine, secure_store.keyring, acme, new_version=False, batch_size=2)
    assert (resumed.target_version, resumed.reencrypted, resumed.remaining) == (2, total - 2, 0)
    assert await dek_versions(secure_store, acme) == {2: total}
    assert await secure_store.keyring.versions(acme) == [1, 2]  # nothing retired without --retire-old
    await plaintexts(secure_store, *fresh_repositories(secure_store, key_provider), acme)


async def test_retirement_is_refused_while_a_record_cannot_move(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    acme, _ = tenant_ids
    conv = await secure_store.conversations.create(acme, metadata={"k": "v"}, items=[message("hello")])
    async with secure_store.engine.begin() as conn:  # damage one record (past its header)
        blob = (await conn.execute(text("SELECT metadata_ct FROM conversations WHERE id = :i"), {"i": conv.id})).scalar_one()
        damaged = bytes(blob[:20]) + bytes([blob[20] ^ 1]) + bytes(blob[21:])
        await conn.execute(update(Conversation).where(Conversation.id == conv.id).values(metadata_ct=damaged))
    report = await reencrypt_tenant(secure_store.engine, secure_store.keyring, acme, target=await secure_store.keyring.rotate(acme))
    assert (report.reencrypted, report.failed, report.remaining) == (1, 1, 1)
    with pytest.raises(ConflictError, match="1 records are still sealed"):
        await rotate_dek(secure_store.engine, secure_store.keyring, acme, new_version=False, retire_old=True,
                         settle_s=0)
    assert await secure_store.keyring.versions(acme) == [1, 2]


async def test_other_processes_follow_a_rotation_within_seconds(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, _ = tenant_ids
    clock = ManualClock()
    unwraps = 0

    class Counting(LocalKeyProvider):
        async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
            nonlocal unwraps
            unwraps += 1
            return await super().unwrap(blob, tenant_id=tenant_id)

    await secure_store.keyring.data_key(acme)
    other = TenantKeyring(secure_store.engine, Counting.open(key_provider.path), clock)
    assert (await other.data_key(acme))[0] == 1
    assert await secure_store.keyring.rotate(acme) == 2
    clock.advance(other.current_ttl_s - 0.1)
    assert (await other.data_key(acme))[0] == 1  # still believed
    clock.advance(0.2)
    assert (await other.data_key(acme))[0] == 2
    assert unwraps == 2  # version 1 once, version 2 once
    for _ in range(5):  # re-checking which version is current costs no provider call
        clock.advance(other.current_ttl_s)
        assert (await other.data_key(acme))[0] == 2
    assert unwraps == 2


BOUNDARY_VERSIONS = [0, 1, 2, 255, 256, 257, 65_535, 65_536, 2**24, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]


async def test_the_sql_version_filter_orders_versions_as_numbers(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    """``substr(ct, 2, 4) < target`` (bytes) agrees with the numeric order on both backends, also
    where a byte-wise comparison of signed or little-endian values would not."""
    from datetime import UTC, datetime

    from skyfleet.crypto.cipher import _seal

    acme, _ = tenant_ids
    now = datetime.now(UTC)
    async with secure_store.engine.begin() as conn:
        for version in BOUNDARY_VERSIONS:
            blob = _seal(bytes(32), bytes(12), b"{}", b"aad", version)
            await conn.execute(
                Conversation.__table__.insert().values(
                    id=f"conv_v{version}", tenant_id=acme, created_at=now, updated_at=now, next_seq=0,
                    metadata_ct=blob,
                )
            )
    for target in BOUNDARY_VERSIONS:
        expected = sum(1 for v in BOUNDARY_VERSIONS if v < target)
        assert await count_older(secure_store.engine, acme, target) == expected, target
