"""KEK rotation (skyfleet keys rotate-kek): no request fails while it runs, on real SQLite and
PostgreSQL; every provider (local, KMS on moto, Vault on the fake server); retirement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from skyfleet.clock import ManualClock
from skyfleet.config import KeySettings
from skyfleet.crypto import (
    DecryptionError,
    LocalKeyProvider,
    RotatingKeyProvider,
    TenantKeyring,
    provider_from_keys,
)
from skyfleet.crypto.providers.local import parse_key_file
from skyfleet.crypto.rotation import rotate_kek
from skyfleet.errors import ConflictError
from skyfleet.state import Store
from skyfleet.state.conversations import ConversationRepository, ResponseRepository
from tests.crypto.kms_fake import REGION, mocked_kms
from tests.fakes.vault_transit import FakeVaultTransit

from .rotation_helpers import message, plaintexts, populate


async def wrapped(store: Store) -> dict[tuple[str, int], bytes]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(text("SELECT tenant_id, version, wrapped_dek FROM tenant_keys"))
        return {(r[0], r[1]): bytes(r[2]) for r in rows}


def repositories(store: Store, provider: Any, **keyring: Any) -> tuple[ConversationRepository, ResponseRepository]:
    ring = TenantKeyring(store.engine, provider, ManualClock(), **keyring)
    return ConversationRepository(store.engine, ring), ResponseRepository(store.engine, ring)


async def test_rotation_under_traffic_fails_no_request_and_leaves_nothing_on_the_old_key(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider, key_path: Path
) -> None:
    for tenant_id, tag in zip(tenant_ids, ("acme", "globex"), strict=True):
        await populate(secure_store, tenant_id, tag)
    # A gateway process: its own view of the key file, opened before the rotation, and no DEK
    # cache at all, so every read and write unwraps through the provider while keys rotate.
    # The readers' provider only ever unwraps: it must notice the new master version by itself.
    gateway, reading = LocalKeyProvider.open(key_path), LocalKeyProvider.open(key_path)
    conversations, responses = repositories(secure_store, gateway, cache_ttl_s=0)
    readers, _ = repositories(secure_store, reading, cache_ttl_s=0)
    expected = {t: await plaintexts(secure_store, conversations, responses, t) for t in tenant_ids}
    stop = asyncio.Event()
    failures: list[BaseException] = []
    loops = {"reader": 0, "writer": 0, "newcomer": 0}
    newcomers: list[tuple[str, str]] = []

    async def reader() -> None:
        while not stop.is_set():
            for tenant_id in tenant_ids:
                for cid, (meta, items) in [(k, v) for k, v in expected[tenant_id].items() if k.startswith("conv_")]:
                    got = await readers.get(tenant_id, cid)
                    assert got.metadata == meta
                    assert [i.item for i in await readers.all_items(tenant_id, cid)] == items
            loops["reader"] += 1

    async def writer() -> None:
        cid = (await conversations.create(tenant_ids[0], metadata={"writer": "yes"})).id
        while not stop.is_set():
            await conversations.add_items(tenant_ids[0], cid, [message(f"during rotation {loops['writer']}")])
            loops["writer"] += 1

    async def newcomer() -> None:  # new tenants: their first DEK is wrapped while the KEK rotates
        while not stop.is_set():
            tenant = await secure_store.tenants.create(f"new-{loops['newcomer']}")
            conv = await conversations.create(tenant.id, metadata={"n": str(loops["newcomer"])})
            newcomers.append((tenant.id, conv.id))
            loops["newcomer"] += 1

    async def guarded(fn: Any) -> None:
        try:
            await fn()
        except BaseException as exc:
            failures.append(exc)
            stop.set()

    tasks = [asyncio.create_task(guarded(fn)) for fn in (reader, writer, newcomer)]
    try:
        report = await rotate_kek(secure_store.engine, key_provider, retire_old=True, settle_s=1.0)
        after = dict(loops)
        deadline = asyncio.get_running_loop().time() + 30
        while not stop.is_set() and any(loops[k] < after[k] + 3 for k in loops):  # traffic goes on after retiring
            assert asyncio.get_running_loop().time() < deadline, "traffic stalled after the rotation"
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert failures == []
    assert all(after.values()), "traffic ran while the keys rotated"
    assert 2 in reading.versions  # it learnt version 2 from the blobs it read
    assert report.retired and report.stale == 0 and report.failed == 0 and report.rewrapped >= 2
    # Nothing depends on the old master version: it is gone from the key file, every stored DEK
    # names version 2, and a fresh process with the new file reads every record.
    assert parse_key_file(key_path.read_bytes()).keys() == {2}
    rows = await wrapped(secure_store)
    assert {key_provider.kek_version(blob) for blob in rows.values()} == {2}
    assert {t for t, _ in rows} >= {*tenant_ids, *(t for t, _ in newcomers)}
    fresh = LocalKeyProvider.open(key_path)
    assert fresh.versions == (2,)
    conversations, responses = repositories(secure_store, fresh)
    for tenant_id in tenant_ids:
        now = await plaintexts(secure_store, conversations, responses, tenant_id)
        for record_id, value in expected[tenant_id].items():
            assert now[record_id] == value
    for tenant_id, conv_id in newcomers:
        assert (await conversations.get(tenant_id, conv_id)).metadata["n"].isdigit()


@asynccontextmanager
async def each_provider(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    if kind == "local":
        yield LocalKeyProvider.open(tmp_path / "keys" / "master.key")
    elif kind == "aws-kms":
        with mocked_kms(monkeypatch):
            yield provider_from_keys(KeySettings(provider="aws-kms", kms_region=REGION), tmp_path)
    else:
        with FakeVaultTransit(token="hvs.t") as vault:
            keys = KeySettings(provider="vault-transit", vault_url=vault.url, vault_token="hvs.t")
            yield provider_from_keys(keys, tmp_path)


@pytest.mark.parametrize("kind", ["local", "aws-kms", "vault-transit"])
async def test_each_provider_rotates_and_retires(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with each_provider(kind, tmp_path, monkeypatch) as provider:
        assert isinstance(provider, RotatingKeyProvider)
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", key_provider=provider)
        try:
            tenants = [(await store.tenants.create(name)).id for name in ("acme", "globex")]
            for tenant_id in tenants:
                await populate(store, tenant_id, tenant_id, conversations=1)
            await store.keyring.rotate(tenants[0])  # two DEK versions: both are rewrapped
            before = await wrapped(store)
            expected = {t: await plaintexts(store, store.conversations, store.responses, t) for t in tenants}
            progress: list[Any] = []
            report = await rotate_kek(store.engine, provider, retire_old=True, settle_s=0, progress=progress.append)
            assert (report.provider, report.tenants, report.rotated) == (kind, 2, 2)
            assert (report.rewrapped, report.failed, report.stale, report.retired) == (3, 0, 0, True)
            assert progress[-1].done == progress[-1].total == 3
            after = await wrapped(store)
            assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
            conversations, responses = repositories(store, provider)
            for tenant_id in tenants:
                assert await plaintexts(store, conversations, responses, tenant_id) == expected[tenant_id]
            old = before[(tenants[0], 1)]
            if kind == "aws-kms":  # KMS keeps a key's older backing keys: nothing to retire
                assert len(await provider.unwrap(old, tenant_id=tenants[0])) == 32
            else:
                with pytest.raises(DecryptionError):
                    await provider.unwrap(old, tenant_id=tenants[0])
        finally:
            await store.close()


async def test_retirement_is_refused_while_a_wrapped_key_cannot_move(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider, key_path: Path
) -> None:
    acme, globex = tenant_ids
    await secure_store.keyring.data_key(acme)
    await secure_store.keyring.data_key(globex)
    await key_provider.shred(globex)  # a shred half done: the KEK is gone, the DEK row is not
    with pytest.raises(ConflictError, match="1 wrapped data keys"):
        await rotate_kek(secure_store.engine, key_provider, retire_old=True, settle_s=0)
    assert parse_key_file(key_path.read_bytes()).keys() == {1, 2}  # nothing retired
    report = await rotate_kek(secure_store.engine, key_provider)  # without retiring: reported
    assert (report.failed, report.stale, report.retired) == (1, 1, False)


