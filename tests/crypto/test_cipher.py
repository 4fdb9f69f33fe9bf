"""DataCipher and record_aad: golden vectors, the primitive's standard vectors, properties."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from skyfleet.crypto import DataCipher, DecryptionError, record_aad
from skyfleet.crypto.cipher import _seal

KEY = bytes(range(32))
NONCE = bytes.fromhex("cafebabefacedbaddecaf888")
PLAINTEXT = b'{"type":"message","role":"user","content":"hello"}'
AAD = record_aad("ten_a", "conversation_item", "conv_1/msg_1")

GOLDEN_AAD = bytes.fromhex(
    "00000016" + b"skyfleet/record-aad/v1".hex()
    + "00000005" + b"ten_a".hex()
    + "00000011" + b"conversation_item".hex()
    + "0000000c" + b"conv_1/msg_1".hex()
)  # fmt: skip
GOLDEN_BLOB = bytes.fromhex(
    "01" "00000007" "cafebabefacedbaddecaf888"
    "f181d45fda1f6d21646638ae087cee5a2f0ce223b0750f5674fd7102dbfb47d38f33ae28b5b1271604610a0057ef4c0a7b"
    "29e2c6b030f3dc031515645b7118a581a2"
)  # fmt: skip

keys = st.binary(min_size=32, max_size=32)
versions = st.integers(min_value=0, max_value=2**32 - 1)
ids = st.text(min_size=1, max_size=40)


def test_record_aad_golden() -> None:
    assert AAD == GOLDEN_AAD


def test_golden_ciphertext() -> None:
    blob = _seal(KEY, NONCE, PLAINTEXT, AAD, 7)
    assert blob == GOLDEN_BLOB
    # Independently: header || nonce || AESGCM(header || aad), straight from `cryptography`.
    header = bytes([1]) + struct.pack(">I", 7)
    assert blob == header + NONCE + AESGCM(KEY).encrypt(NONCE, PLAINTEXT, header + AAD)
    assert DataCipher.decrypt(KEY, GOLDEN_BLOB, AAD) == PLAINTEXT
    assert DataCipher.key_version(GOLDEN_BLOB) == 7


# McGrew & Viega, "The Galois/Counter Mode of Operation" (the NIST GCM submission), AES-256 cases.
GCM_VECTORS = [
    ("00" * 32, "00" * 12, "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"),  # test case 13
    (
        "00" * 32,
        "00" * 12,
        "00" * 16,
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
    ),
    (  # test case 16
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        "cafebabefacedbaddecaf888",
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
        "49a6b525b16aedf5aa0de657ba637b39",
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b10"
        "56828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
]


@pytest.mark.parametrize(("key", "iv", "pt", "aad", "ct", "tag"), GCM_VECTORS)
def test_aes_gcm_primitive_standard_vectors(key: str, iv: str, pt: str, aad: str, ct: str, tag: str) -> None:
    aead = AESGCM(bytes.fromhex(key))
    sealed = aead.encrypt(bytes.fromhex(iv), bytes.fromhex(pt), bytes.fromhex(aad) or None)
    assert sealed == bytes.fromhex(ct + tag)
    assert aead.decrypt(bytes.fromhex(iv), sealed, bytes.fromhex(aad) or None) == bytes.fromhex(pt)


@given(dek=keys, plaintext=st.binary(max_size=2048), aad=st.binary(max_size=256), version=versions)
def test_round_trip(dek: bytes, plaintext: bytes, aad: bytes, version: int) -> None:
    blob = DataCipher.encrypt(dek, plaintext, aad, key_version=version)
    assert DataCipher.decrypt(dek, blob, aad) == plaintext
    assert DataCipher.key_version(blob) == version
    assert len(blob) == 1 + 4 + 12 + len(plaintext) + 16


def test_random_nonce_per_record() -> None:
    blobs = {DataCipher.encrypt(KEY, PLAINTEXT, AAD) for _ in range(50)}
    assert len(blobs) == 50
    assert len({b[5:17] for b in blobs}) == 50


@given(plaintext=st.binary(max_size=64), data=st.data())
def test_tampering_with_any_byte_fails(plaintext: bytes, data: st.DataObject) -> None:
    blob = DataCipher.encrypt(KEY, plaintext, AAD, key_version=3)
    index = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    tampered = bytearray(blob)
    tampered[index] ^= flip
    with pytest.raises(DecryptionError):
        DataCipher.decrypt(KEY, bytes(tampered), AAD)


def test_every_single_byte_flip_fails() -> None:
    for index in range(len(GOLDEN_BLOB)):
        tampered = bytearray(GOLDEN_BLOB)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptionError):
            DataCipher.decrypt(KEY, bytes(tampered), AAD)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        GOLDEN_BLOB[:16],
        GOLDEN_BLOB[:32],
        GOLDEN_BLOB[:-1],
        GOLDEN_BLOB + b"\x00",
        b"\x02" + GOLDEN_BLOB[1:],
    ],
)
def test_truncated_extended_or_unknown_format_fails(blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        DataCipher.decrypt(KEY, blob, AAD)


def test_unknown_format_has_no_key_version() -> None:
    with pytest.raises(DecryptionError):
        DataCipher.key_version(b"\x02" + GOLDEN_BLOB[1:])
    with pytest.raises(DecryptionError):
        DataCipher.key_version(b"\x01\x00")


@pytest.mark.parametrize(
    "other_aad",
    [
        record_aad("ten_b", "conversation_item", "conv_1/msg_1"),  # another tenant
        record_aad("ten_a", "conversation_item", "conv_1/msg_2"),  # another record
        record_aad("ten_a", "response_item", "conv_1/msg_1"),  # another kind
        record_aad("ten_a", "conversation_item", "conv_2/msg_1"),  # another container
        b"",
    ],
)
def test_wrong_aad_fails(other_aad: bytes) -> None:
    with pytest.raises(DecryptionError):
        DataCipher.decrypt(KEY, GOLDEN_BLOB, other_aad)


@given(dek=keys)
def test_wrong_key_fails(dek: bytes) -> None:
    if dek != KEY:
        with pytest.raises(DecryptionError):
            DataCipher.decrypt(dek, GOLDEN_BLOB, AAD)


@pytest.mark.parametrize("dek", [b"", b"short", bytes(31), bytes(33)])
def test_bad_key_sizes(dek: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        DataCipher.encrypt(dek, b"x", b"")
    with pytest.raises(DecryptionError):
        DataCipher.decrypt(dek, GOLDEN_BLOB, AAD)


def test_the_error_is_opaque() -> None:
    with pytest.raises(DecryptionError) as caught:
        DataCipher.decrypt(KEY, GOLDEN_BLOB, b"wrong")
    assert str(caught.value) == "ciphertext could not be decrypted"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@given(a=st.tuples(ids, ids, ids), b=st.tuples(ids, ids, ids))
def test_record_aad_is_injective(a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    assert (record_aad(*a) == record_aad(*b)) == (a == b)


def test_record_aad_does_not_concatenate_ambiguously() -> None:
    assert record_aad("ab", "c", "d") != record_aad("a", "bc", "d")
    assert record_aad("a", "b", "c/d") != record_aad("a", "b/c", "d")


@pytest.mark.parametrize("parts", [("", "k", "r"), ("t", "", "r"), ("t", "k", "")])
def test_record_aad_refuses_empty_parts(parts: tuple[str, str, str]) -> None:
    with pytest.raises(ValueError):
        record_aad(*parts)
