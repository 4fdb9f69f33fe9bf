"""AES-256-GCM record encryption with a versioned, self-describing ciphertext format.

Format v1 (all integers big-endian)::

    offset  size  field
    0       1     format version (0x01)
    1       4     DEK version (u32) - which of the tenant's data keys encrypted this record
    5       12    nonce (random per record)
    17      n+16  AES-GCM ciphertext || 16-byte tag

The 5-byte header is authenticated (it is prepended to the caller's AAD), so neither the
format nor the DEK version can be altered without the tag failing.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from skyfleet.crypto.errors import DecryptionError

FORMAT_V1 = 0x01
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_KEY_VERSION = 0xFFFFFFFF
_HEADER = struct.Struct(">BI")
_PREFIX_BYTES = _HEADER.size + NONCE_BYTES
_LENGTH = struct.Struct(">I")
_RECORD_AAD_DOMAIN = b"skyfleet/record-aad/v1"


def frame(*parts: str | bytes) -> bytes:
    """An unambiguous encoding of ``parts``: each one u32-length-prefixed (text as UTF-8)."""
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        out += _LENGTH.pack(len(raw))
        out += raw
    return bytes(out)


def record_aad(tenant_id: str, kind: str, record_id: str) -> bytes:
    """Associated data binding a ciphertext to its tenant, record kind and record id."""
    for value in (tenant_id, kind, record_id):
        if not isinstance(value, str) or not value:
            raise ValueError("record_aad needs three non-empty strings")
    return frame(_RECORD_AAD_DOMAIN, tenant_id, kind, record_id)


def _check_key(dek: bytes) -> None:
    if not isinstance(dek, bytes | bytearray) or len(dek) != KEY_BYTES:
        raise ValueError("a data key is 32 bytes (AES-256)")


def _seal(dek: bytes, nonce: bytes, plaintext: bytes, aad: bytes, key_version: int) -> bytes:
    """Encrypt with a given nonce. Only :meth:`DataCipher.encrypt` (random nonce) and tests call it."""
    _check_key(dek)
    if len(nonce) != NONCE_BYTES:
        raise ValueError("the nonce is 12 bytes")
    if not isinstance(key_version, int) or not 0 <= key_version <= MAX_KEY_VERSION:
        raise ValueError("key_version must fit in 32 bits")
    header = _HEADER.pack(FORMAT_V1, key_version)
    return header + nonce + AESGCM(bytes(dek)).encrypt(nonce, bytes(plaintext), header + bytes(aad))


class DataCipher:
    """Encrypts records under a tenant's data key (DEK)."""

    @staticmethod
    def encrypt(dek: bytes, plaintext: bytes, aad: bytes, *, key_version: int = 1) -> bytes:
        """Seal ``plaintext``; ``key_version`` (the DEK's version) is recorded in the header."""
        return _seal(dek, os.urandom(NONCE_BYTES), plaintext, aad, key_version)

    @staticmethod
    def decrypt(dek: bytes, blob: bytes, aad: bytes) -> bytes:
        """Open a sealed record; :class:`DecryptionError` on anything wrong."""
        try:
            _check_key(dek)
            fmt, _version = _HEADER.unpack_from(blob)
            if fmt != FORMAT_V1 or len(blob) < _PREFIX_BYTES + TAG_BYTES:
                raise DecryptionError
            nonce = bytes(blob[_HEADER.size : _PREFIX_BYTES])
            header = bytes(blob[: _HEADER.size])
            return AESGCM(bytes(dek)).decrypt(nonce, bytes(blob[_PREFIX_BYTES:]), header + bytes(aad))
        except (InvalidTag, ValueError, TypeError, struct.error, DecryptionError):
            raise DecryptionError from None

    @staticmethod
    def key_version(blob: bytes) -> int:
        """The DEK version a sealed record names (unauthenticated until decrypted)."""
        try:
            fmt, version = _HEADER.unpack_from(blob)
        except (struct.error, TypeError):
            raise DecryptionError from None
        if fmt != FORMAT_V1 or len(blob) < _PREFIX_BYTES + TAG_BYTES:
            raise DecryptionError
        return int(version)
