"""Gateways learn about changed keys and tenants from the same poll as revocations (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from skyfleet.iam.apikeys import hash_key
from skyfleet.state import Store


async def test_changes_to_a_key_or_its_tenant_are_reported_like_revocations(store: Store) -> None:
    await store.tenants.create("acme")
    await store.tenants.create("globex")
    a1, rec1 = await store.keys.create("acme", role="tenant-admin")
    a2, _ = await store.keys.create("acme")
    g1, _ = await store.keys.create("globex")
    since = datetime.now(UTC) - timedelta(seconds=1)
    assert await store.keys.revoked_since(since) == []  # creating keys changes nothing cached

    await store.keys.update(rec1.id, {"role": "member"})  # a demotion
    assert set(await store.keys.revoked_since(since)) == {hash_key(a1)}

    await store.tenants.update("acme", {"rpm_limit": 10})  # every key of the tenant
    assert set(await store.keys.revoked_since(since)) == {hash_key(a1), hash_key(a2)}

    await store.tenants.delete("globex")
    assert set(await store.keys.revoked_since(since)) == {hash_key(a1), hash_key(a2), hash_key(g1)}
    # A later window sees none of it.
    assert await store.keys.revoked_since(datetime.now(UTC) + timedelta(seconds=1)) == []
