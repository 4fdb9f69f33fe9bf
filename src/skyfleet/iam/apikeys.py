"""API key format: generation, hashing and a cheap syntactic check. Pure functions, no I/O.

A key is ``sk-sf-`` followed by 43 URL-safe base64 characters (32 random bytes). Keys are
high-entropy, so a plain SHA-256 is a sufficient one-way function: only the hash is stored,
and lookups are by hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "sk-sf-"
#: Random bytes behind every generated key.
KEY_BYTES = 32
#: Characters of a key shown in listings (the prefix and six more).
DISPLAY_PREFIX_LENGTH = 12
#: Bounds on the part after the prefix: 43 for generated keys, with headroom for a future format.
KEY_BODY_MIN_LENGTH = 40
KEY_BODY_MAX_LENGTH = 64

_KEY_RE = re.compile(
    rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{{KEY_BODY_MIN_LENGTH},{KEY_BODY_MAX_LENGTH}}}", re.ASCII
)


def generate_key() -> str:
    """A new random key; the caller shows it once and stores only :func:`hash_key` of it."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    """Hex SHA-256 of ``key`` (64 lowercase hex characters)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters of ``key``, safe to show in listings (e.g. ``sk-sf-AbCdEf``)."""
    return key[:DISPLAY_PREFIX_LENGTH]


def looks_like_key(value: str) -> bool:
    """Whether ``value`` has the shape of one of our keys (checked before any lookup)."""
    if not isinstance(value, str):
        return False
    if not len(KEY_PREFIX) + KEY_BODY_MIN_LENGTH <= len(value) <= len(KEY_PREFIX) + KEY_BODY_MAX_LENGTH:
        return False
    return _KEY_RE.fullmatch(value) is not None
