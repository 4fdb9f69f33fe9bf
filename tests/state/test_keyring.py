"""TenantKeyring on real SQLite and PostgreSQL: creation races, caching, rotation, shredding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from skyfleet.clock import ManualClock
from skyfleet.crypto import DataCipher, DecryptionError, LocalKeyProvider, TenantKeyring, record_aad
from skyfleet.errors import NotFoundError
from skyfleet.state import Store, make_engine, make_session_factory


async def key_rows(store: Store, tenant_id: str) -> list[tuple[int, bytes, str]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT version, wrapped_dek, provider FROM tenant_keys WHERE tenant_id = :t ORDER BY version"
            ),
            {"t": tenant_id},
        )
        return [(r[0], bytes(r[1]), r[2]) for r in rows]


async def test_first_use_creates_and_persists_a_wrapped_key(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, globex = tenant_ids
    version, dek = await secure_store.keyring.data_key(acme)
    assert version == 1 and len(dek) == 32
    [(v, wrapped, provider)] = await key_rows(secure_store, acme)
    assert (v, provider) == (1, "local") and dek not in wrapped
    assert await key_provider.unwrap(wrapped, tenant_id=acme) == dek
    # A fresh keyring (another process) reads the same key; another tenant gets its own.
    other = TenantKeyring(secure_store.engine, key_provider, ManualClock())
    assert await other.data_key(acme) == (1, dek)
    assert await other.data_key_version(acme, 1) == dek
    assert (await other.data_key(globex))[1] != dek


async def test_concurrent_first_use_agrees_on_one_key(
    db_url: str, secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, _ = tenant_ids
    engines = [make_engine(db_url) for _ in range(4)]
    try:
        keyrings = [TenantKeyring(e, key_provider, ManualClock()) for e in engines for _ in range(3)]
        results = await asyncio.gather(*(k.data_key(acme) for k in keyrings))
    finally:
        for engine in engines:
            await engine.dispose()
    assert len(set(results)) == 1 and results[0][0] == 1
    assert len(await key_rows(secure_store, acme)) == 1


async def test_accepts_a_session_factory(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    keyring = TenantKeyring(make_session_factory(secure_store.engine), key_provider, ManualClock())
    assert await keyring.data_key(tenant_ids[0]) == await secure_store.keyring.data_key(tenant_ids[0])


async def test_unknown_tenant(secure_store: Store) -> None:
    with pytest.raises(NotFoundError):
        await secure_store.keyring.data_key("ten_nobody")
    with pytest.raises(DecryptionError):
        await secure_store.keyring.data_key_version("ten_nobody", 1)


async def test_cache_expires_after_ttl(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, _ = tenant_ids
    clock = ManualClock()
    keyring = TenantKeyring(secure_store.engine, key_provider, clock, cache_ttl_s=60)
    version, dek = await keyring.data_key(acme)
    async with secure_store.engine.begin() as conn:  # as if another process shredded the tenant
        await conn.execute(text("DELETE FROM tenant_keys WHERE tenant_id = :t"), {"t": acme})
    clock.advance(59)
    assert await keyring.data_key_version(acme, version) == dek  # still cached
    clock.advance(1)
    with pytest.raises(DecryptionError):
        await keyring.data_key_version(acme, version)


async def test_cache_is_bounded(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, globex = tenant_ids
    keyring = TenantKeyring(secure_store.engine, key_provider, ManualClock(), max_cached=1)
    await keyring.data_key(acme)
    _, globex_dek = await keyring.data_key(globex)  # evicts acme's key
    async with secure_store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM tenant_keys"))
    assert await keyring.data_key_version(globex, 1) == globex_dek
    with pytest.raises(DecryptionError):
        await keyring.data_key_version(acme, 1)
    keyring.forget()
    with pytest.raises(DecryptionError):
        await keyring.data_key_version(globex, 1)


async def test_rotation_keeps_old_records_readable(secure_store: Store, tenant_ids: tuple[str, str]) -> None:
    acme, _ = tenant_ids
    keyring = secure_store.keyring
    aad = record_aad(acme, "conversation", "conv_x")
    v1, dek1 = await keyring.data_key(acme)
    old = DataCipher.encrypt(dek1, b"old", aad, key_version=v1)
    assert await keyring.rotate(acme) == 2
    v2, dek2 = await keyring.data_key(acme)
    assert v2 == 2 and dek2 != dek1
    new = DataCipher.encrypt(dek2, b"new", aad, key_version=v2)
    keyring.forget()
    for blob, plaintext in ((old, b"old"), (new, b"new")):
        dek = await keyring.data_key_version(acme, DataCipher.key_version(blob))
        assert DataCipher.decrypt(dek, blob, aad) == plaintext
    assert [r[0] for r in await key_rows(secure_store, acme)] == [1, 2]


async def test_shred_deletes_rows_and_keys(
    secure_store: Store, tenant_ids: tuple[str, str], key_provider: LocalKeyProvider
) -> None:
    acme, globex = tenant_ids
    keyring = secure_store.keyring
    _, dek = await keyring.data_key(acme)
    [(_, wrapped, _)] = await key_rows(secure_store, acme)
    _, globex_dek = await keyring.data_key(globex)
    await keyring.shred(acme)
    assert await key_rows(secure_store, acme) == []
    with pytest.raises(DecryptionError):
        await keyring.data_key_version(acme, 1)
    with pytest.raises(DecryptionError):  # the provider forgot the tenant too
        await key_provider.unwrap(wrapped, tenant_id=acme)
    version, fresh = await keyring.data_key(acme)  # new data gets a new key
    assert version == 1 and fresh != dek
    assert await keyring.data_key_version(globex, 1) == globex_dek


class OtherProvider(LocalKeyProvider):
    name = "other"


async def test_keys_of_another_provider_are_refused(
    secure_store: Store, tenant_ids: tuple[str, str], key_path: Path
) -> None:
    acme, _ = tenant_ids
    await secure_store.keyring.data_key(acme)
    other = TenantKeyring(secure_store.engine, OtherProvider.open(key_path), ManualClock())
    with pytest.raises(DecryptionError):
        await other.data_key(acme)


def test_store_without_a_key_provider_says_so(store: Store) -> None:
    for attribute in ("conversations", "responses", "keyring"):
        with pytest.raises(Exception, match="key_provider"):
            getattr(store, attribute)
