"""TenantRepository on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta

import pytest

from skyfleet.errors import ConflictError, InvalidRequestError, NotFoundError
from skyfleet.iam.apikeys import hash_key
from skyfleet.state import Store, TenantRecord


async def test_create_get_list(store: Store) -> None:
    beta = await store.tenants.create("beta")
    alpha = await store.tenants.create("alpha")
    assert beta.name == "beta"
    assert beta.id.startswith("ten_") and len(beta.id) == 20 and beta.id != alpha.id
    assert beta.created_at.tzinfo is UTC
    assert await store.tenants.get("beta") == beta
    assert await store.tenants.list() == [alpha, beta]


async def test_list_empty(store: Store) -> None:
    assert await store.tenants.list() == []


@pytest.mark.parametrize("name", ["a", "0", "a" * 63, "acme-corp_2", "9lives"])
async def test_valid_names(store: Store, name: str) -> None:
    assert (await store.tenants.create(name)).name == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "Acme", "-acme", "_acme", "a" * 64, "a b", "a/b", "a.b", "é", "acme\n", "a;drop", "\uff41"],
)
async def test_invalid_names(store: Store, name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await store.tenants.create(name)
    assert info.value.param == "name"
    assert await store.tenants.list() == []


async def test_duplicate_is_conflict(store: Store) -> None:
    await store.tenants.create("acme")
    with pytest.raises(ConflictError) as info:
        await store.tenants.create("acme")
    assert info.value.status == 409
    assert len(await store.tenants.list()) == 1


async def test_concurrent_duplicate_creates_one_wins(store: Store) -> None:
    results = await asyncio.gather(*(store.tenants.create("race") for _ in range(8)), return_exceptions=True)
    assert sum(isinstance(r, TenantRecord) for r in results) == 1
    assert sum(isinstance(r, ConflictError) for r in results) == 7
    assert [t.name for t in await store.tenants.list()] == ["race"]


async def test_concurrent_duplicate_creates_across_stores(db_url: str) -> None:
    # Two gateways (two engines, two pools) racing on one database.
    stores = [await Store.open(db_url) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(s.tenants.create("race") for s in stores for _ in range(3)), return_exceptions=True
        )
        assert sum(isinstance(r, TenantRecord) for r in results) == 1
        assert all(isinstance(r, (TenantRecord, ConflictError)) for r in results)
    finally:
        for s in stores:
            await s.close()


async def test_get_missing(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.tenants.get("nope")
    with pytest.raises(NotFoundError):
        await store.tenants.get("Not A Valid Name")


async def test_delete_hides_tenant_and_revokes_its_keys(store: Store) -> None:
    await store.tenants.create("doomed")
    await store.tenants.create("kept")
    doomed_keys = [await store.keys.create("doomed") for _ in range(3)]
    kept_key, _ = await store.keys.create("kept")
    first = await store.keys.revoke(doomed_keys[0][1].id)

    await store.tenants.delete("doomed")

    with pytest.raises(NotFoundError):
        await store.tenants.get("doomed")
    assert [t.name for t in await store.tenants.list()] == ["kept"]
    for key, _ in doomed_keys:
        assert await store.keys.lookup(hash_key(key)) is None
    assert await store.keys.lookup(hash_key(kept_key)) is not None
    records = {r.id: r for r in await store.keys.list() if r.tenant_name == "doomed"}
    assert len(records) == 3 and all(r.revoked_at is not None for r in records.values())
    assert records[first.id].revoked_at == first.revoked_at  # the earlier revocation is kept
    revoked = await store.keys.revoked_since(first.created_at - timedelta(seconds=1))
    assert set(revoked) == {hash_key(k) for k, _ in doomed_keys}
    with pytest.raises(NotFoundError):
        await store.keys.list("doomed")
    with pytest.raises(NotFoundError):
        await store.keys.create("doomed")


async def test_delete_missing_or_twice(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.tenants.delete("ghost")
    await store.tenants.create("once")
    await store.tenants.delete("once")
    with pytest.raises(NotFoundError):
        await store.tenants.delete("once")


async def test_name_reusable_after_delete(store: Store) -> None:
    old = await store.tenants.create("phoenix")
    old_key, _ = await store.keys.create("phoenix")
    await store.tenants.delete("phoenix")
    new = await store.tenants.create("phoenix")
    assert new.id != old.id
    assert await store.tenants.get("phoenix") == new
    assert await store.keys.lookup(hash_key(old_key)) is None
    assert await store.keys.list("phoenix") == []
