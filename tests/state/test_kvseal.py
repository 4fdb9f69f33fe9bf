"""Saved llama.cpp slots sealed with the tenant's data key (engines/kvseal.py), on the real keyring."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfleet.crypto.cipher import DataCipher
from skyfleet.engines.kvseal import SEALED_SUFFIX, SlotSealer, scratch_name
from skyfleet.engines.kvstate import delete_tenant_slot_files, slot_file
from skyfleet.errors import ServiceUnavailableError
from skyfleet.state import Store

KV = b"ggsq" + bytes(range(256)) * 64  # stands in for a llama.cpp state file (token ids, KV tensors)


@pytest.fixture
def slots(tmp_path: Path) -> Path:
    path = tmp_path / "slots"
    path.mkdir()
    return path


def _sealed(tenant_id: str, session: str) -> str:
    return slot_file(tenant_id, session).removesuffix(".bin") + SEALED_SUFFIX


async def _save(sealer: SlotSealer, slots: Path, tenant_id: str, session: str, data: bytes = KV) -> str:
    """What LlamaSlots does on a save: llama.cpp writes a scratch file, the sealer seals it."""
    name = _sealed(tenant_id, session)
    scratch = scratch_name(name)
    (slots / scratch).write_bytes(data)
    assert await sealer.seal(tenant_id, scratch, name)
    return name


async def test_seal_then_open_round_trips_and_leaves_no_plaintext(
        secure_store: Store, tenant_ids: tuple[str, str], slots: Path) -> None:
    acme, _ = tenant_ids
    sealer = SlotSealer(slots, secure_store.keyring)
    name = await _save(sealer, slots, acme, "s1")
    assert sorted(p.name for p in slots.iterdir()) == [name]  # the scratch file is gone
    blob = (slots / name).read_bytes()
    assert KV[:64] not in blob and DataCipher.key_version(blob) == 1
    scratch = await sealer.open(acme, name)
    assert scratch is not None and scratch != name
    assert (slots / scratch).read_bytes() == KV
    await sealer.discard(scratch)
    assert sorted(p.name for p in slots.iterdir()) == [name]  # sealed stays for the next restore


async def test_a_file_moved_to_another_tenant_or_session_does_not_open_and_is_deleted(
        secure_store: Store, tenant_ids: tuple[str, str], slots: Path) -> None:
    acme, globex = tenant_ids
    sealer = SlotSealer(slots, secure_store.keyring)
    name = await _save(sealer, slots, acme, "s1")
    for tenant, session in ((globex, "s1"), (acme, "s2")):
        other = _sealed(tenant, session)
        (slots / other).write_bytes((slots / name).read_bytes())
        assert await sealer.open(tenant, other) is None
        assert not (slots / other).exists()
    assert await sealer.open(acme, name) is not None  # the original still opens
    assert sealer.stats["unreadable"] == 2


async def test_after_a_shred_or_rotation_retire_files_no_longer_open(
        secure_store: Store, tenant_ids: tuple[str, str], slots: Path) -> None:
    acme, globex = tenant_ids
    sealer = SlotSealer(slots, secure_store.keyring)
    old = await _save(sealer, slots, acme, "old")
    await secure_store.keyring.rotate(acme)
    new = await _save(sealer, slots, acme, "new")
    assert DataCipher.key_version((slots / new).read_bytes()) == 2
    assert await sealer.open(acme, old) is not None  # older versions still open until retired
    await secure_store.keyring.retire(acme, below=2)
    assert await sealer.open(acme, old) is None and await sealer.open(acme, new) is not None
    gone = await _save(sealer, slots, globex, "s")
    await secure_store.keyring.shred(globex)
    assert await sealer.open(globex, gone) is None


async def test_a_missing_scratch_file_is_reported_not_raised(
        secure_store: Store, tenant_ids: tuple[str, str], slots: Path) -> None:
    acme, _ = tenant_ids
    sealer = SlotSealer(slots, secure_store.keyring)
    name = _sealed(acme, "s")
    assert not await sealer.seal(acme, scratch_name(name), name)  # e.g. the replica's disk is not this host's
    assert await sealer.open(acme, name) is None
    assert list(slots.iterdir()) == []


def test_deleting_a_tenants_files_spares_other_tenants_and_other_files(tmp_path: Path) -> None:
    mine = [slot_file("ten_a", "s"), _sealed("ten_a", "t"), scratch_name(_sealed("ten_a", "u")),
            f".{_sealed('ten_a', 'v')}.0123456789ab.tmp"]
    theirs = [_sealed("ten_ab", "s"), _sealed("ten_b", "s"), "ten_a-notes.txt"]
    for name in mine + theirs:
        (tmp_path / name).write_bytes(b"x")
    assert delete_tenant_slot_files(tmp_path, "ten_a") == len(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
    assert delete_tenant_slot_files(tmp_path / "absent", "ten_a") == 0


class _KeysDown:
    """The keyring when its database is unreachable."""

    async def data_key(self, tenant_id: str, *, fresh: bool = False) -> tuple[int, bytes]:
        raise ServiceUnavailableError("the state store is unreachable")

    async def data_key_version(self, tenant_id: str, version: int) -> bytes:
        raise ServiceUnavailableError("the state store is unreachable")


async def test_without_keys_a_save_is_dropped_and_a_sealed_file_is_kept_for_later(
        secure_store: Store, tenant_ids: tuple[str, str], slots: Path) -> None:
    acme, _ = tenant_ids
    name = await _save(SlotSealer(slots, secure_store.keyring), slots, acme, "s")
    down = SlotSealer(slots, _KeysDown())
    other = _sealed(acme, "t")
    scratch = scratch_name(other)
    (slots / scratch).write_bytes(KV)
    assert not await down.seal(acme, scratch, other)
    assert sorted(p.name for p in slots.iterdir()) == [name]  # no plaintext left behind
    assert await down.open(acme, name) is None and (slots / name).exists()
    assert await SlotSealer(slots, secure_store.keyring).open(acme, name) is not None
