"""Property tests for the API key format (pure functions, no database)."""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from skyfleet.iam.apikeys import (
    KEY_BODY_MAX_LENGTH,
    KEY_BODY_MIN_LENGTH,
    KEY_PREFIX,
    display_prefix,
    generate_key,
    hash_key,
    looks_like_key,
)

URLSAFE = string.ascii_letters + string.digits + "-_"
HEX = set("0123456789abcdef")

generated_body = st.text(alphabet=URLSAFE, min_size=43, max_size=43)
bad_char = st.characters(
    blacklist_characters=URLSAFE,
    blacklist_categories=["Cs"],  # anything outside the alphabet
)


def test_generate_key_shape_and_uniqueness() -> None:
    keys = [generate_key() for _ in range(2000)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) == len(KEY_PREFIX) + 43
        assert set(key[len(KEY_PREFIX) :]) <= set(URLSAFE)
        assert looks_like_key(key)
        assert display_prefix(key) == key[:12]


@given(generated_body)
def test_every_possible_generated_key_looks_like_a_key(body: str) -> None:
    # token_urlsafe(32) yields exactly 43 characters of this alphabet.
    assert looks_like_key(KEY_PREFIX + body)


@given(st.text())
def test_hash_key_deterministic_hex_sha256(key: str) -> None:
    digest = hash_key(key)
    assert digest == hash_key(key)
    assert len(digest) == 64 and set(digest) <= HEX
    assert digest == hashlib.sha256(key.encode()).hexdigest()


@given(st.text(), st.text())
def test_distinct_keys_distinct_hashes(a: str, b: str) -> None:
    assume(a != b)
    assert hash_key(a) != hash_key(b)


@given(st.text())
def test_rejects_anything_without_the_prefix(value: str) -> None:
    assume(not value.startswith(KEY_PREFIX))
    assert not looks_like_key(value)


@given(generated_body, st.integers(min_value=0, max_value=42), bad_char)
def test_rejects_one_foreign_character(body: str, index: int, char: str) -> None:
    assert not looks_like_key(KEY_PREFIX + body[:index] + char + body[index + 1 :])


@given(
    st.integers(min_value=0, max_value=KEY_BODY_MIN_LENGTH - 1) | st.integers(KEY_BODY_MAX_LENGTH + 1, 10**5)
)
def test_rejects_bodies_out_of_bounds(length: int) -> None:
    assert not looks_like_key(KEY_PREFIX + "A" * length)


@given(st.text(min_size=1), st.booleans())
def test_rejects_keys_wrapped_in_junk(junk: str, before: bool) -> None:
    assume(not set(junk) <= set(URLSAFE))  # one foreign character anywhere disqualifies
    key = generate_key()
    assert not looks_like_key(junk + key if before else key + junk)


@pytest.mark.parametrize(
    "value",
    [
        "",
        KEY_PREFIX,
        "' OR '1'='1",
        "sk-sf-' OR '1'='1' --",
        KEY_PREFIX + "A" * 40 + "'; DROP TABLE api_keys; --",
        KEY_PREFIX + "A" * 43 + "\n",
        KEY_PREFIX + "A" * 43 + "\x00",
        KEY_PREFIX + "A" * 42 + "=",
        KEY_PREFIX + "Ä" * 43,
        KEY_PREFIX + "A" * 10_000_000,
        "SK-SF-" + "A" * 43,
        "Bearer " + KEY_PREFIX + "A" * 43,
    ],
)
def test_rejects_known_junk(value: str) -> None:
    assert not looks_like_key(value)


@pytest.mark.parametrize("value", [None, b"sk-sf-" + b"A" * 43, 12345])
def test_rejects_non_strings(value: object) -> None:
    assert not looks_like_key(value)  # type: ignore[arg-type]
