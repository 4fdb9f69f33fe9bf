"""Key restrictions (models, CIDRs, limits) and tenant limits in the store, on real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from skyfleet.errors import InvalidRequestError, NotFoundError
from skyfleet.iam.apikeys import hash_key
from skyfleet.state import Store


@pytest.fixture
async def acme(store: Store) -> Store:
    await store.tenants.create("acme")
    await store.tenants.create("globex")
    return store


async def test_restrictions_round_trip_into_the_credential(acme: Store) -> None:
    key, record = await acme.keys.create("acme", models=["m2", "m1", "m1"], cidrs=["10.1.2.3/8", "::1"],
                                         rpm_limit=60, tpm_limit=6000)
    assert (record.models, record.cidrs) == (("m1", "m2"), ("10.0.0.0/8", "::1/128"))
    assert await acme.keys.get(record.id) == record
    await acme.tenants.update("acme", {"rpm_limit": 600, "tpm_limit": 60_000, "share_public_prefix": True})
    cred = await acme.keys.lookup(hash_key(key))
    assert cred is not None
    assert (cred.models, cred.cidrs, cred.rpm_limit, cred.tpm_limit) == (
        frozenset({"m1", "m2"}), ("10.0.0.0/8", "::1/128"), 60, 6000)
    assert (cred.tenant_rpm_limit, cred.tenant_tpm_limit, cred.share_public_prefix) == (600, 60_000, True)
    plain, _ = await acme.keys.create("acme")
    cred = await acme.keys.lookup(hash_key(plain))
    assert cred is not None and (cred.models, cred.cidrs, cred.rpm_limit) == (None, None, None)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"models": []}, "models"), ({"models": "m1"}, "models"), ({"models": [""]}, "models"),
    ({"models": ["x" * 201]}, "models"), ({"models": [f"m{i}" for i in range(65)]}, "models"),
    ({"cidrs": []}, "cidrs"), ({"cidrs": ["banana"]}, "cidrs"), ({"cidrs": "10.0.0.0/8"}, "cidrs"),
    ({"rpm_limit": 0}, "rpm_limit"), ({"tpm_limit": True}, "tpm_limit"), ({"rpm_limit": 10**10}, "rpm_limit"),
])
async def test_bad_restrictions_are_refused(acme: Store, kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await acme.keys.create("acme", **kwargs)
    assert info.value.param == param
    assert await acme.keys.list() == []


async def test_update_changes_only_what_is_given(acme: Store) -> None:
    _, record = await acme.keys.create("acme", name="ci", models=["m1"], rpm_limit=5)
    when = datetime.now(UTC) + timedelta(days=1)
    updated = await acme.keys.update(record.id, {"models": None, "cidrs": ["192.168.0.0/16"], "expires_at": when,
                                                 "role": "read-only"})
    assert (updated.name, updated.models, updated.cidrs, updated.rpm_limit, updated.role) == (
        "ci", None, ("192.168.0.0/16",), 5, "read-only")
    assert updated.expires_at is not None and abs((updated.expires_at - when).total_seconds()) < 1e-3
    with pytest.raises(InvalidRequestError):
        await acme.keys.update(record.id, {"tenant_id": "ten_x"})
    with pytest.raises(InvalidRequestError):
        await acme.keys.update(record.id, {"role": "emperor"})
    assert await acme.keys.get(record.id) == updated


async def test_guards_scope_update_and_revoke(acme: Store) -> None:
    globex = await acme.tenants.get("globex")
    _, admin = await acme.keys.create("acme", role="platform-admin")
    _, member = await acme.keys.create("acme", role="member")
    low = ["tenant-admin", "member", "read-only"]
    for call in (acme.keys.update(member.id, {"rpm_limit": 1}, tenant_id=globex.id, roles=low),
                 acme.keys.revoke(member.id, tenant_id=globex.id),
                 acme.keys.update(admin.id, {"rpm_limit": 1}, tenant_id=admin.tenant_id, roles=low),
                 acme.keys.revoke(admin.id, tenant_id=admin.tenant_id, roles=low)):
        with pytest.raises(NotFoundError):
            await call
    assert (await acme.keys.get(admin.id)).revoked_at is None and (await acme.keys.get(member.id)).rpm_limit is None
    assert (await acme.keys.revoke(member.id, tenant_id=member.tenant_id, roles=low)).revoked_at is not None
    with pytest.raises(InvalidRequestError):  # a revoked key stays as it was
        await acme.keys.update(member.id, {"rpm_limit": 1})


async def test_tenant_update(acme: Store) -> None:
    t = await acme.tenants.update("acme", {"rpm_limit": 100, "retention_days": 7})
    assert (t.rpm_limit, t.tpm_limit, t.retention_days, t.share_public_prefix) == (100, None, 7, False)
    t = await acme.tenants.update("acme", {"rpm_limit": None, "share_public_prefix": True})
    assert (t.rpm_limit, t.retention_days, t.share_public_prefix) == (None, 7, True)
    assert await acme.tenants.get("acme") == t
    assert [x.share_public_prefix for x in await acme.tenants.list()] == [True, False]
    for changes in ({"name": "x"}, {"deleted_at": None}, {"tpm_limit": -1}, {"share_public_prefix": 1}):
        with pytest.raises(InvalidRequestError):
            await acme.tenants.update("acme", changes)
    with pytest.raises(NotFoundError):
        await acme.tenants.update("initech", {"rpm_limit": 1})
