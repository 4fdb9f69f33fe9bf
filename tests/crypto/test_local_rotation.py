"""LocalKeyProvider KEK rotation: the multi-version key file (golden vectors, properties),
rotation seen by other processes, rewrap, retirement."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from skyfleet.config import ConfigError
from skyfleet.crypto import DecryptionError, LocalKeyProvider, RotatingKeyProvider
from skyfleet.crypto.cipher import frame
from skyfleet.crypto.providers.local import format_key_file, parse_key_file

DEK = bytes(range(32))
GOLDEN_MASTER = bytes(range(0x40, 0x60))
GOLDEN_SECRET = bytes(range(0x80, 0xA0))
GOLDEN_KEY_ID = bytes.fromhex("0102030405060708")
GOLDEN_NONCE = bytes(range(0xC0, 0xCC))
#: Key file with master versions 3 (all zero bytes) and 7 (GOLDEN_MASTER).
GOLDEN_KEY_FILE = bytes.fromhex(
    "53464b3100000003" + "00" * 32 + "53464b3100000007" + GOLDEN_MASTER.hex()
)
#: DEK 00..1f of tenant "ten_golden", wrapped under master version 7 (wrapped blob v1).
GOLDEN_BLOB = bytes.fromhex(
    "01000000070102030405060708c0c1c2c3c4c5c6c7c8c9cacbd7be5cfcdb6e93d87e3bd37ef8bc0cf2bed552e1f25acd38"
    "9f7c3f9874ea879456d81e608806e369f909f958229e6277"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_0600(path: Path, content: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "master.key"


def test_golden_key_file() -> None:
    assert parse_key_file(GOLDEN_KEY_FILE) == {3: bytes(32), 7: GOLDEN_MASTER}
    assert format_key_file({7: GOLDEN_MASTER, 3: bytes(32)}) == GOLDEN_KEY_FILE


def test_golden_wrapped_blob_matches_an_independent_computation() -> None:
    header = bytes([1]) + struct.pack(">I", 7) + GOLDEN_KEY_ID
    kek = HKDF(hashes.SHA256(), 32, salt=GOLDEN_SECRET, info=frame(b"skyfleet/tenant-kek/v1", "ten_golden"))
    sealed = AESGCM(kek.derive(GOLDEN_MASTER)).encrypt(
        GOLDEN_NONCE, DEK, header + frame(b"skyfleet/wrapped-dek/v1", "ten_golden")
    )
    assert header + GOLDEN_NONCE + sealed == GOLDEN_BLOB
    assert LocalKeyProvider._seal(GOLDEN_MASTER, 7, GOLDEN_KEY_ID, GOLDEN_SECRET, DEK, "ten_golden",
                                  GOLDEN_NONCE) == GOLDEN_BLOB


async def test_golden_files_on_disk_unwrap(key_path: Path) -> None:
    write_0600(key_path, GOLDEN_KEY_FILE)
    tenant_file = key_path.with_name("master.key.tenants") / (hashlib.sha256(b"ten_golden").hexdigest() + ".key")
    write_0600(tenant_file, b"SFT1" + GOLDEN_KEY_ID + GOLDEN_SECRET)
    provider = LocalKeyProvider.open(key_path)
    assert provider.versions == (3, 7) and provider.version == 7
    assert await provider.unwrap(GOLDEN_BLOB, tenant_id="ten_golden") == DEK
    assert provider.kek_version(GOLDEN_BLOB) == 7


@given(st.dictionaries(st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=32), min_size=1, max_size=6))
def test_key_file_round_trips(masters: dict[int, bytes]) -> None:
    raw = format_key_file(masters)
    assert len(raw) == 40 * len(masters)
    assert parse_key_file(raw) == masters


@given(st.binary(max_size=200))
def test_garbage_is_not_a_key_file(raw: bytes) -> None:
    try:
        masters = parse_key_file(raw)
    except ValueError:
        return
    assert format_key_file(masters) == raw  # only well-formed files parse


def test_unordered_or_duplicate_versions_are_refused() -> None:
    one, two = format_key_file({1: bytes(32)}), format_key_file({2: bytes(32)})
    for raw in (two + one, one + one, one + b"SFK2" + two[4:]):
        with pytest.raises(ValueError):
            parse_key_file(raw)


async def test_rotation_rewrap_and_retirement(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    assert isinstance(provider, RotatingKeyProvider)
    elsewhere = LocalKeyProvider.open(key_path)  # another process, opened before the rotation
    old = await provider.wrap(DEK, tenant_id="ten_a")
    assert provider.kek_version(old) == 1
    assert await provider.rotate_kek(["ten_a"]) == 1
    assert provider.versions == (1, 2) and mode(key_path) == 0o600 and len(key_path.read_bytes()) == 80
    assert [p.name for p in key_path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert await provider.unwrap(old, tenant_id="ten_a") == DEK  # still readable
    new = await provider.rewrap(old, tenant_id="ten_a")
    assert provider.kek_version(new) == 2 and await provider.rewrap(new, tenant_id="ten_a") is new
    # The other process unwraps the new blob (re-reads the file) and wraps with the new version.
    assert elsewhere.versions == (1,)
    assert await elsewhere.unwrap(new, tenant_id="ten_a") == DEK
    assert elsewhere.kek_version(await elsewhere.wrap(DEK, tenant_id="ten_b")) == 2
    assert await provider.current_kek_version("ten_a") == 2
    await provider.retire_old_keks(["ten_a"])
    assert parse_key_file(key_path.read_bytes()).keys() == {2}
    for reader in (provider, LocalKeyProvider.open(key_path)):
        with pytest.raises(DecryptionError):
            await reader.unwrap(old, tenant_id="ten_a")
        assert await reader.unwrap(new, tenant_id="ten_a") == DEK
    assert await elsewhere.unwrap(old, tenant_id="ten_a") == DEK  # held in memory until it re-reads...
    await elsewhere.wrap(DEK, tenant_id="ten_a")  # ... which every wrap does
    with pytest.raises(DecryptionError):
        await elsewhere.unwrap(old, tenant_id="ten_a")


async def test_retirement_refuses_a_key_file_rotated_meanwhile(key_path: Path) -> None:
    provider = LocalKeyProvider.open(key_path)
    other = LocalKeyProvider.open(key_path)
    await provider.rotate_kek([])
    await other.rotate_kek([])  # version 3, unknown to `provider`
    with pytest.raises(ConfigError, match="changed during the rotation"):
        await provider.retire_old_keks([])
    assert parse_key_file(key_path.read_bytes()).keys() == {1, 2, 3}


def test_concurrent_rotations_lose_no_version(key_path: Path) -> None:
    LocalKeyProvider.open(key_path)

    def rotate(_: int) -> int:
        return LocalKeyProvider.open(key_path)._add_version()

    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = sorted(pool.map(rotate, range(8)))
    assert versions == list(range(2, 10))
    assert sorted(parse_key_file(key_path.read_bytes())) == list(range(1, 10))
