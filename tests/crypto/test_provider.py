"""LocalKeyProvider: the key file on disk, wrapping bound to the tenant, shredding."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from skyfleet.config import ConfigError
from skyfleet.crypto import DecryptionError, KeyProvider, LocalKeyProvider

DEK = bytes(range(100, 132))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "kek.key"


def test_key_file_is_created_0600_with_a_version_header(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    assert isinstance(provider, KeyProvider)
    assert mode(key_path) == 0o600
    raw = key_path.read_bytes()
    assert len(raw) == 4 + 4 + 32 and raw[:4] == b"SFK1" and raw[4:8] == (1).to_bytes(4, "big")
    assert mode(provider.tenant_dir) == 0o700
    assert [p.name for p in key_path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_key_file_is_0600_whatever_the_umask(key_path: Path) -> None:
    previous = os.umask(0)
    try:
        LocalKeyProvider.open(key_path)
    finally:
        os.umask(previous)
    assert mode(key_path) == 0o600


async def test_reopening_loads_the_same_key(key_path: Path) -> None:
    first = LocalKeyProvider.open(key_path)
    raw = key_path.read_bytes()
    second = LocalKeyProvider.open(key_path)
    assert key_path.read_bytes() == raw
    blob = await first.wrap(DEK, tenant_id="ten_a")
    assert await second.unwrap(blob, tenant_id="ten_a") == DEK


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_group_or_world_accessible_key_file_is_refused(key_path: Path, bad_mode: int) -> None:
    LocalKeyProvider.open(key_path)
    raw = key_path.read_bytes()
    key_path.chmod(bad_mode)
    with pytest.raises(ConfigError, match=r"accessible by group or others .*chmod 600"):
        LocalKeyProvider.open(key_path)
    assert key_path.read_bytes() == raw  # refused, never replaced


def test_foreign_0644_file_is_refused_not_overwritten(key_path: Path) -> None:
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(b"SFK1" + bytes(36))
    key_path.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):
        LocalKeyProvider.open(key_path)


@pytest.mark.parametrize("content", [b"", b"SFK1", b"XXXX" + bytes(36), b"SFK1" + bytes(37)])
def test_corrupt_key_file_is_refused(key_path: Path, content: bytes) -> None:
    key_path.parent.mkdir(parents=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ConfigError, match="not a skyfleet key file"):
        LocalKeyProvider.open(key_path)


def test_concurrent_first_opens_agree_on_one_key(key_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        providers = list(pool.map(lambda _: LocalKeyProvider.open(key_path), range(16)))
    assert len({p._master for p in providers}) == 1
    assert mode(key_path) == 0o600


async def test_wrap_unwrap_is_bound_to_the_tenant(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert DEK not in blob
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    await provider.wrap(DEK, tenant_id="ten_b")  # ten_b has its own wrapping secret now
    for other in ("ten_b", "ten_c", "ten_a "):
        with pytest.raises(DecryptionError):
            await provider.unwrap(blob, tenant_id=other)
    assert mode(provider._tenant_path("ten_a")) == 0o600


async def test_tampered_wrapped_key_fails(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    for index in range(len(blob)):
        tampered = bytearray(blob)
        tampered[index] ^= 0x80
        with pytest.raises(DecryptionError):
            await provider.unwrap(bytes(tampered), tenant_id="ten_a")
    for cut in (b"", blob[:10], blob[:-1], blob + b"\x00"):
        with pytest.raises(DecryptionError):
            await provider.unwrap(cut, tenant_id="ten_a")


async def test_another_key_file_cannot_unwrap(tmp_path: Path) -> None:
    first = LocalKeyProvider.open(tmp_path / "one" / "kek.key")
    second = LocalKeyProvider.open(tmp_path / "two" / "kek.key")
    blob = await first.wrap(DEK, tenant_id="ten_a")
    await second.wrap(DEK, tenant_id="ten_a")
    with pytest.raises(DecryptionError):
        await second.unwrap(blob, tenant_id="ten_a")


async def test_shred_forgets_the_tenant_for_good(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    blob_a = await provider.wrap(DEK, tenant_id="ten_a")
    blob_b = await provider.wrap(DEK, tenant_id="ten_b")
    await provider.shred("ten_a")
    assert not provider._tenant_path("ten_a").exists()
    with pytest.raises(DecryptionError):
        await provider.unwrap(blob_a, tenant_id="ten_a")
    # A new wrap makes a new wrapping secret: the old blob still does not open.
    fresh = await provider.wrap(DEK, tenant_id="ten_a")
    assert await provider.unwrap(fresh, tenant_id="ten_a") == DEK
    with pytest.raises(DecryptionError):
        await provider.unwrap(blob_a, tenant_id="ten_a")
    assert await provider.unwrap(blob_b, tenant_id="ten_b") == DEK  # others untouched
    await provider.shred("ten_never_seen")  # idempotent, no error


async def test_group_readable_tenant_secret_is_refused(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    provider._tenant_path("ten_a").chmod(0o644)
    with pytest.raises(ConfigError, match="tenant key file"):
        await provider.unwrap(blob, tenant_id="ten_a")
