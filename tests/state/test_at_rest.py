"""What is on disk: no plaintext (canary), crypto-shredding, and shredding surviving a restore."""

from __future__ import annotations

import asyncio
import os
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from skyfleet.crypto import DecryptionError, LocalKeyProvider
from skyfleet.state import Store
from skyfleet.state.conversations import export_tenant
from skyfleet.state.db import make_session_factory

from .conftest import throwaway_database
from .test_conversations import count, message

CANARY = "CANARY-d41d8cd98f00b204-PLAINTEXT"
VISIBLE_MODEL = "visible-model-name-0042"  # a plaintext column: proves the scan would see text


async def run(*argv: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=PIPE, stderr=PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv[0]} failed: {err.decode()[-2000:]}"
    return out


def pg_args(url: str) -> list[str]:
    parsed = make_url(url)
    return [
        "-h",
        parsed.host or "127.0.0.1",
        "-p",
        str(parsed.port or 5432),
        "-U",
        parsed.username or "postgres",
    ]


async def plant_canaries(store: Store, tenant_id: str) -> dict[str, str]:
    """Put the canary everywhere tenant-private data goes; returns the ids."""
    conv = await store.conversations.create(
        tenant_id, metadata={"note": CANARY}, items=[message(f"conversation item {CANARY}")]
    )
    await store.conversations.add_items(tenant_id, conv.id, [message(f"added {CANARY}")])
    begun = await store.responses.begin(
        tenant_id,
        model=VISIBLE_MODEL,
        conversation_id=conv.id,
        previous_response_id=None,
        input_items=[message(f"input {CANARY}")],
        body={"instructions": f"instructions {CANARY}", "metadata": {"m": CANARY}},
        store=True,
    )
    done = await store.responses.complete(
        tenant_id,
        begun.id,
        body={
            "instructions": f"instructions {CANARY}",
            "output_text": f"out {CANARY}",
            "status": "completed",
        },
        output_items=[message(f"output {CANARY}", "assistant")],
        input_tokens=3,
        output_tokens=4,
        cached_tokens=0,
    )
    failed = await store.responses.begin(
        tenant_id,
        model=VISIBLE_MODEL,
        conversation_id=None,
        previous_response_id=done.id,
        input_items=[message(f"doomed {CANARY}")],
        body={"instructions": CANARY},
        store=True,
    )
    await store.responses.fail(tenant_id, failed.id, status="failed", error={"message": f"error {CANARY}"})
    return {"conversation": conv.id, "response": done.id}


def scan(blob: bytes) -> tuple[bool, bool]:
    """(canary found, as text or as hex bytea), (the visible plaintext model name found)."""
    needles = [CANARY.encode(), CANARY.encode().hex().encode(), CANARY.encode("utf-16-le")]
    return any(n in blob for n in needles), VISIBLE_MODEL.encode() in blob


async def test_no_plaintext_in_the_sqlite_file(tmp_path: Path, key_provider: LocalKeyProvider) -> None:
    path = tmp_path / "canary.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}", key_provider=key_provider)
    try:
        tenant = await store.tenants.create("canary")
        await plant_canaries(store, tenant.id)
        async with store.engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        await store.close()
    files = sorted(p for p in tmp_path.iterdir() if p.name.startswith("canary.db"))
    content = b"".join(p.read_bytes() for p in files)
    assert scan(content) == (False, True)


async def test_no_plaintext_in_a_pg_dump(pg_url: str, key_provider: LocalKeyProvider) -> None:
    store = await Store.open(pg_url, key_provider=key_provider)
    try:
        tenant = await store.tenants.create("canary")
        await plant_canaries(store, tenant.id)
    finally:
        await store.close()
    dump = await run(
        "pg_dump", *pg_args(pg_url), "--format=plain", "--no-owner", make_url(pg_url).database or ""
    )
    assert scan(dump) == (False, True)


async def assert_undecryptable(store: Store, tenant_id: str, ids: dict[str, str]) -> None:
    calls: list[Any] = [
        store.conversations.get(tenant_id, ids["conversation"]),
        store.conversations.all_items(tenant_id, ids["conversation"]),
        store.conversations.list_items(tenant_id, ids["conversation"]),
        store.responses.get(tenant_id, ids["response"]),
        store.responses.input_items(tenant_id, ids["response"]),
        store.responses.history(tenant_id, ids["response"]),
    ]
    for call in calls:
        with pytest.raises(DecryptionError):
            await call
    with pytest.raises(DecryptionError):
        async for _ in export_tenant(make_session_factory(store.engine), store.keyring, tenant_id):
            pass


async def row_counts(store: Store, tenant_id: str) -> dict[str, int]:
    tables = ("conversations", "conversation_items", "responses", "response_items", "tenant_keys")
    return {
        t: await count(store, f"SELECT count(*) FROM {t} WHERE tenant_id = :t", t=tenant_id) for t in tables
    }


async def test_shredding_makes_records_undecryptable(
    secure_store: Store, tenant_ids: tuple[str, str]
) -> None:
    acme, globex = tenant_ids
    ids = await plant_canaries(secure_store, acme)
    other = await plant_canaries(secure_store, globex)
    before = await row_counts(secure_store, acme)
    await secure_store.keyring.shred(acme)
    after = await row_counts(secure_store, acme)
    assert (
        after == {**before, "tenant_keys": 0} and after["conversation_items"] > 0
    )  # the rows are still there
    await assert_undecryptable(secure_store, acme, ids)
    # A fresh keyring (another process, empty cache) cannot either; the other tenant is untouched.
    reopened = Store(secure_store.engine, key_provider=secure_store.keyring.provider)
    await assert_undecryptable(reopened, acme, ids)
    assert (await reopened.conversations.get(globex, other["conversation"])).metadata == {"note": CANARY}
    assert len(await reopened.responses.history(globex, other["response"])) == 2


async def test_shredding_survives_restoring_a_backup(
    pg_url: str, pg_admin: AsyncEngine, tmp_path: Path, key_path: Path
) -> None:
    provider = LocalKeyProvider.open(key_path)
    store = await Store.open(pg_url, key_provider=provider)
    try:
        acme = (await store.tenants.create("acme")).id
        globex = (await store.tenants.create("globex")).id
        ids = await plant_canaries(store, acme)
        other = await plant_canaries(store, globex)
        # The nightly backup, taken before the shredding: it holds acme's wrapped DEK.
        dump = tmp_path / "backup.dump"
        await run(
            "pg_dump", *pg_args(pg_url), "--format=custom", f"--file={dump}", make_url(pg_url).database or ""
        )
        await store.keyring.shred(acme)
        await assert_undecryptable(store, acme, ids)
    finally:
        await store.close()
    async with throwaway_database(pg_admin) as restored_url:
        await run(
            "pg_restore",
            *pg_args(restored_url),
            "--no-owner",
            f"--dbname={make_url(restored_url).database}",
            str(dump),
        )
        # A freshly started gateway on the restored database, with the (same) key directory.
        restored = await Store.open(restored_url, key_provider=LocalKeyProvider.open(key_path))
        try:
            counts = await row_counts(restored, acme)
            assert counts["tenant_keys"] == 1 and counts["conversation_items"] > 0  # the DEK came back...
            await assert_undecryptable(restored, acme, ids)  # ...and opens nothing.
            # The restore itself is sound: the other tenant's data decrypts.
            assert (await restored.conversations.get(globex, other["conversation"])).metadata == {
                "note": CANARY
            }
            assert len(await restored.conversations.all_items(globex, other["conversation"])) == 4
        finally:
            await restored.close()
    assert not os.path.exists(provider._tenant_path(acme))
