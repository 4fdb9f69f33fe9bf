"""ApiKeyRepository on real SQLite and PostgreSQL, and the no-plaintext canary."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, make_url, text

from skyfleet.errors import InvalidRequestError, NotFoundError
from skyfleet.iam.apikeys import display_prefix, hash_key, looks_like_key
from skyfleet.state import ROLES, Credential, Store


@pytest.fixture
async def acme(store: Store) -> Store:
    await store.tenants.create("acme")
    return store


async def test_create_and_lookup(acme: Store) -> None:
    key, record = await acme.keys.create("acme", role="tenant-admin", name="ci")
    assert looks_like_key(key)
    assert record.id.startswith("key_") and len(record.id) == 20
    assert record.prefix == display_prefix(key) and record.prefix != key
    assert (record.tenant_name, record.name, record.role) == ("acme", "ci", "tenant-admin")
    assert record.created_at.tzinfo is UTC and record.revoked_at is None and record.expires_at is None
    tenant = await acme.tenants.get("acme")
    assert record.tenant_id == tenant.id
    assert await acme.keys.lookup(hash_key(key)) == Credential(
        key_id=record.id,
        key_hash=hash_key(key),
        tenant_id=tenant.id,
        tenant_name="acme",
        role="tenant-admin",
        expires_at=None,
    )


async def test_default_role_is_member(acme: Store) -> None:
    _, record = await acme.keys.create("acme")
    assert record.role == "member"


@pytest.mark.parametrize("role", ROLES)
async def test_every_role(acme: Store, role: str) -> None:
    key, record = await acme.keys.create("acme", role=role)
    assert record.role == role
    credential = await acme.keys.lookup(hash_key(key))
    assert credential is not None and credential.role == role


@pytest.mark.parametrize("role", ["admin", "", "Member", "platform_admin", "member "])
async def test_unknown_role(acme: Store, role: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await acme.keys.create("acme", role=role)
    assert info.value.param == "role"
    assert await acme.keys.list() == []


async def test_unknown_tenant(acme: Store) -> None:
    with pytest.raises(NotFoundError):
        await acme.keys.create("other")
    with pytest.raises(NotFoundError):
        await acme.keys.list("other")


async def test_name_too_long(acme: Store) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await acme.keys.create("acme", name="x" * 201)
    assert info.value.param == "name"


async def test_lookup_unknown_or_malformed_hash(acme: Store) -> None:
    await acme.keys.create("acme")
    assert await acme.keys.lookup(hash_key("sk-sf-unknown")) is None
    assert await acme.keys.lookup("") is None
    assert await acme.keys.lookup("' OR 1=1 --") is None
    assert await acme.keys.lookup("A" * 64) is None


async def test_revoke(acme: Store) -> None:
    key, record = await acme.keys.create("acme")
    other, _ = await acme.keys.create("acme")
    revoked = await acme.keys.revoke(record.id)
    assert revoked.id == record.id and revoked.revoked_at is not None
    assert revoked.revoked_at.tzinfo is UTC and revoked.revoked_at >= record.created_at
    assert await acme.keys.lookup(hash_key(key)) is None
    assert await acme.keys.lookup(hash_key(other)) is not None
    again = await acme.keys.revoke(record.id)
    assert again == revoked  # idempotent: the first revocation time is kept


async def test_revoke_unknown(acme: Store) -> None:
    with pytest.raises(NotFoundError):
        await acme.keys.revoke("key_doesnotexist00")


async def test_list(acme: Store) -> None:
    await acme.tenants.create("beta")
    _, a1 = await acme.keys.create("acme", name="one")
    _, b1 = await acme.keys.create("beta")
    _, a2 = await acme.keys.create("acme", name="two", role="read-only")
    a1 = await acme.keys.revoke(a1.id)
    assert await acme.keys.list("acme") == [a1, a2]
    assert await acme.keys.list("beta") == [b1]
    assert await acme.keys.list() == [a1, b1, a2]


async def test_concurrent_creates(acme: Store) -> None:
    created = await asyncio.gather(*(acme.keys.create("acme") for _ in range(10)))
    assert len({k for k, _ in created}) == 10 and len({r.id for _, r in created}) == 10
    assert len(await acme.keys.list("acme")) == 10


async def test_expires_at_round_trips_as_aware_utc(acme: Store) -> None:
    expires = datetime(2031, 5, 17, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=2)))
    key, record = await acme.keys.create("acme", expires_at=expires)
    credential = await acme.keys.lookup(hash_key(key))
    (listed,) = await acme.keys.list("acme")
    for value in (record.expires_at, credential and credential.expires_at, listed.expires_at):
        assert value == expires
        assert isinstance(value, datetime) and value.tzinfo is UTC
        assert value.hour == 21 and value.microsecond == 123456
    assert listed == record


async def test_expired_key_still_looked_up(acme: Store) -> None:
    # Expiry is the caller's check (it caches credentials); lookup hands back expires_at.
    past = datetime.now(UTC) - timedelta(days=1)
    key, _ = await acme.keys.create("acme", expires_at=past)
    credential = await acme.keys.lookup(hash_key(key))
    assert credential is not None and credential.expires_at == past


async def test_naive_datetimes_refused(acme: Store) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await acme.keys.create("acme", expires_at=datetime(2031, 1, 1))
    assert info.value.param == "expires_at"
    with pytest.raises(InvalidRequestError) as info:
        await acme.keys.revoked_since(datetime(2031, 1, 1))
    assert info.value.param == "since"


async def test_revoked_since(acme: Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    k1, r1 = await acme.keys.create("acme")
    k2, r2 = await acme.keys.create("acme")
    await acme.keys.create("acme")
    assert await acme.keys.revoked_since(before) == []
    r1 = await acme.keys.revoke(r1.id)
    assert r1.revoked_at is not None
    assert await acme.keys.revoked_since(before) == [hash_key(k1)]
    assert await acme.keys.revoked_since(r1.revoked_at) == [hash_key(k1)]  # inclusive
    assert await acme.keys.revoked_since(r1.revoked_at + timedelta(microseconds=1)) == []
    # Any timezone works for `since`.
    in_tokyo = r1.revoked_at.astimezone(timezone(timedelta(hours=9)))
    assert await acme.keys.revoked_since(in_tokyo) == [hash_key(k1)]
    r2 = await acme.keys.revoke(r2.id)
    assert await acme.keys.revoked_since(before) == [hash_key(k1), hash_key(k2)]
    assert r2.revoked_at is not None
    assert await acme.keys.revoked_since(r2.revoked_at) == [hash_key(k2)]


async def text_columns(store: Store) -> list[str]:
    """Every value of every text column of every table, read back from the database."""
    async with store.engine.connect() as conn:

        def columns(sync_conn: object) -> dict[str, list[str]]:
            insp = inspect(sync_conn)
            return {
                table: [
                    c["name"]
                    for c in insp.get_columns(table)
                    if c["type"].python_type is str  # VARCHAR / TEXT
                ]
                for table in insp.get_table_names()
            }

        values: list[str] = []
        for table, names in (await conn.run_sync(columns)).items():
            for name in names:
                rows = await conn.execute(text(f'SELECT "{name}" FROM "{table}"'))
                values.extend(v for v in rows.scalars() if v is not None)
        return values


async def test_canary_no_plaintext_key_is_stored(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        await store.tenants.create("canary")
        keys = [(await store.keys.create("canary", name=f"k{i}", role=ROLES[i % 4]))[0] for i in range(5)]
        await store.keys.revoke((await store.keys.list("canary"))[0].id)
        values = await text_columns(store)
        assert values and set(map(hash_key, keys)) <= set(values)  # the canary can see the data
        secrets_ = [k[len(display_prefix(k)) :] for k in keys]  # the part never shown anywhere
        for value in values:
            for key, secret in zip(keys, secrets_, strict=True):
                assert key not in value and secret not in value
        if store.engine.dialect.name == "sqlite":
            async with store.engine.connect() as conn:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        await store.close()
    if db_url.startswith("sqlite"):
        path = Path(str(make_url(db_url).database))
        files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
        raw = b"".join(p.read_bytes() for p in files)
        assert hash_key(keys[0]).encode() in raw  # reading the right bytes
        for key, secret in zip(keys, secrets_, strict=True):
            assert key.encode() not in raw and secret.encode() not in raw
