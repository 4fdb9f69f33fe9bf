"""The audit hash chain: golden vectors, sanitising, and tamper detection (hypothesis)."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from skyfleet.audit.chain import (
    GENESIS,
    MAX_DETAIL_STRING,
    REDACTED,
    Anchor,
    SealedEntry,
    canonical,
    clean_detail,
    decode_detail,
    draft,
    encode_detail,
    entry_hash,
    seal,
    verify,
)

# -- golden vectors: the canonical form and the hash are a stable, documented format --

GOLDEN_1 = (
    b'{"action":"key.revoke","actor":"key_abcdefghijklmnop","at":"2025-03-01T12:00:00.123456Z",'
    b'"detail":{"count":3,"none":null,"ok":true,"ratio":0.5,"role":"member"},"outcome":"ok","seq":1,'
    b'"target":"key_234567abcdefghij","tenant_id":"ten_qrstuvwxyz234567"}'
)
GOLDEN_1_HASH = "b40b941dec4a8f8f9b7c1aff67b8966d030cb72613c3dd85f0ace52c14db1317"
GOLDEN_2 = (
    b'{"action":"tenant.delete","actor":"cli","at":"2025-03-01T12:00:01.000000Z","detail":{},"outcome":"ok",'
    b'"seq":2,"target":"acme","tenant_id":"ten_qrstuvwxyz234567"}'
)
GOLDEN_2_HASH = "886a185b91adca5bb8ec27bc79b91a550db0f4cd46615830de67ba8368e64bbf"


def _golden_chain() -> list[SealedEntry]:
    first = draft(
        datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC), "key.revoke", actor="key_abcdefghijklmnop",
        tenant_id="ten_qrstuvwxyz234567", target="key_234567abcdefghij",
        detail={"role": "member", "count": 3, "ok": True, "ratio": 0.5, "none": None},
    )
    # A non-UTC offset is normalised to UTC.
    second = draft(datetime(2025, 3, 1, 13, 0, 1, tzinfo=UTC).astimezone(UTC) - timedelta(hours=1),
                   "tenant.delete", actor="cli", tenant_id="ten_qrstuvwxyz234567", target="acme")
    return seal(0, GENESIS, [first, second])


def test_golden_vectors() -> None:
    first, second = _golden_chain()
    assert canonical(1, first) == GOLDEN_1
    assert canonical(2, second) == GOLDEN_2
    # hash = sha256(prev_hash as 64 hex ASCII characters || canonical bytes)
    assert hashlib.sha256(b"0" * 64 + GOLDEN_1).hexdigest() == GOLDEN_1_HASH
    assert hashlib.sha256(GOLDEN_1_HASH.encode() + GOLDEN_2).hexdigest() == GOLDEN_2_HASH
    assert (first.seq, first.prev_hash, first.hash) == (1, GENESIS, GOLDEN_1_HASH)
    assert (second.seq, second.prev_hash, second.hash) == (2, GOLDEN_1_HASH, GOLDEN_2_HASH)
    assert verify([first, second]) is None
    assert verify([first, second], Anchor(2, GOLDEN_2_HASH)) is None


def test_non_utc_timestamps_are_normalised() -> None:
    from datetime import timezone

    at = datetime(2025, 3, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    d = draft(at, "x.y")
    assert b'"at":"2025-03-01T12:00:00.123456Z"' in canonical(1, d)
    with pytest.raises(ValueError):
        draft(datetime(2025, 3, 1), "x.y")


def test_anchor_parse() -> None:
    assert Anchor.parse(f" 2:{GOLDEN_2_HASH}\n") == Anchor(2, GOLDEN_2_HASH)
    assert str(Anchor(2, GOLDEN_2_HASH)) == f"2:{GOLDEN_2_HASH}"
    for bad in ("", "2", f"0:{GOLDEN_2_HASH}", "2:abc", f"x:{GOLDEN_2_HASH}", f"2:{GOLDEN_2_HASH.upper()}"):
        with pytest.raises(ValueError):
            Anchor.parse(bad)


def test_problems_are_named() -> None:
    a, b = _golden_chain()
    c = seal(b.seq, b.hash, [draft(datetime(2025, 3, 2, tzinfo=UTC), "key.create")])[0]
    assert verify([a, c]) is not None and verify([a, c]).kind == "missing" and verify([a, c]).seq == 2
    assert verify([b, c]).kind == "missing" and verify([b, c]).seq == 1
    changed = dataclasses.replace(b, target="other")
    assert (verify([a, changed, c]).kind, verify([a, changed, c]).seq) == ("modified", 2)
    rehashed = dataclasses.replace(changed, hash=entry_hash(changed.prev_hash, 2, changed))
    assert (verify([a, rehashed, c]).kind, verify([a, rehashed, c]).seq) == ("broken-link", 3)
    assert verify([a, b, c], Anchor(3, GOLDEN_2_HASH)).kind == "anchor"
    assert (verify([a, b], Anchor(3, c.hash)).kind, verify([a, b], Anchor(3, c.hash)).seq) == ("anchor", 3)
    assert verify([b, a]).kind == "missing"
    assert verify([a, a]).kind == "out-of-order"


# -- sanitising --


def test_detail_is_scalars_only_and_never_a_key() -> None:
    key = "sk-sf-" + "A" * 43
    out = clean_detail({
        "role": "member", "n": 3, "nested": {"a": 1}, "items": [1], "note": f"use {key} please",
        "api_key": "whatever", "prompt": "tell me a secret", "prompt_tokens": 12, "key_id": "key_abc",
        "Bad-Name": "x", "long": "x" * 1000, "big": 2**70, "nan": float("nan"), "nul": "a\x00b",
        "jwt": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "openai": "sk-" + "b" * 40,
    })
    assert out["role"] == "member" and out["n"] == 3
    assert out["prompt_tokens"] == 12 and out["key_id"] == "key_abc"
    assert out["nested"] is None and out["items"] is None
    assert out["note"] == REDACTED and out["jwt"] == REDACTED and out["openai"] == REDACTED
    assert "api_key" not in out and "prompt" not in out and "Bad-Name" not in out
    assert len(out["long"]) == MAX_DETAIL_STRING and out["long"].endswith("…")
    assert out["big"] == str(2**70) and out["nan"] is None and out["nul"] == "ab"
    d = draft(datetime(2025, 1, 1, tzinfo=UTC), "Not An Action!", target=key, actor="x" * 500)
    assert d.action == "invalid" and d.target == REDACTED and len(d.actor or "") == 80


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.text(max_size=300), st.lists(st.integers(), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@given(st.dictionaries(st.text(max_size=80), _scalars, max_size=40),
       st.text(alphabet="Aa0_-", min_size=40, max_size=64), st.text(max_size=50))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_sanitised_detail_is_storable_and_secret_free(detail: dict, body: str, around: str) -> None:
    detail = {**detail, "planted": around + "sk-sf-" + body + around}
    out = clean_detail(detail)
    encoded = encode_detail(out)
    assert decode_detail(encoded) == out  # round-trips through its TEXT column
    assert len(out) <= 32
    for value in out.values():
        assert value is None or isinstance(value, bool | int | float | str)
        if isinstance(value, str):
            assert len(value) <= MAX_DETAIL_STRING and "sk-sf-" not in value.lower() and "\x00" not in value
    assert "sk-sf-" not in (encoded or "").lower()


# -- tamper detection: properties over random chains --

_names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
_opt_text = st.none() | st.text(max_size=40)
_drafts = st.builds(
    draft,
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,2}", fullmatch=True),
    outcome=st.sampled_from(["ok", "error", "denied"]),
    actor=_opt_text, tenant_id=_opt_text, target=_opt_text,
    detail=st.dictionaries(_names, st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
                           | st.booleans(), max_size=4),
)
_chains = st.lists(_drafts, min_size=1, max_size=12).map(lambda ds: seal(0, GENESIS, ds))


@given(_chains)
def test_untouched_chain_verifies(chain: list[SealedEntry]) -> None:
    assert verify(chain) is None
    assert verify(chain, Anchor(chain[-1].seq, chain[-1].hash)) is None
    # A prefix anchored on an earlier entry also verifies: anchors stay valid as the log grows.
    assert verify(chain, Anchor(1, chain[0].hash)) is None
    # Appending to a sealed chain continues it.
    more = seal(chain[-1].seq, chain[-1].hash, [draft(datetime(2030, 1, 1, tzinfo=UTC), "a.b")])
    assert verify(chain + more) is None


def _anchor(chain: list[SealedEntry]) -> Anchor:
    return Anchor(chain[-1].seq, chain[-1].hash)


_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
_FIELDS = {
    "at": _times,
    "action": st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    "outcome": st.sampled_from(["ok", "error", "denied", "x"]),
    "actor": _opt_text, "tenant_id": _opt_text, "target": _opt_text,
    "detail": st.dictionaries(_names, st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=3),
    "seq": st.integers(min_value=-5, max_value=50),
    "prev_hash": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    "hash": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
}


@given(_chains, st.data(), st.booleans())
@settings(max_examples=150)
def test_any_modification_is_detected(chain: list[SealedEntry], data: st.DataObject, rehash: bool) -> None:
    i = data.draw(st.integers(0, len(chain) - 1), label="index")
    name = data.draw(st.sampled_from(sorted(_FIELDS)), label="field")
    value = data.draw(_FIELDS[name], label="value")
    old = chain[i]
    assume(getattr(old, name) != value)
    if name == "detail":
        assume(dict(old.detail) != value)
    new = dataclasses.replace(old, **{name: value})
    if rehash and name != "hash":
        # The forger also recomputes the entry's own hash (but cannot fix the entries after it).
        new = dataclasses.replace(new, hash=entry_hash(new.prev_hash, new.seq, new))
        assume(new.hash != old.hash)
    tampered = [*chain[:i], new, *chain[i + 1:]]
    if rehash and name != "hash" and i == len(chain) - 1 and name != "seq":
        # Rewriting the newest entry consistently is only visible against an anchor.
        assert verify(tampered, _anchor(chain)) is not None
    else:
        assert verify(tampered) is not None


@given(_chains, st.data())
def test_any_deletion_is_detected(chain: list[SealedEntry], data: st.DataObject) -> None:
    assume(len(chain) >= 2)
    i = data.draw(st.integers(0, len(chain) - 1))
    tampered = chain[:i] + chain[i + 1:]
    if i < len(chain) - 1:
        assert verify(tampered) is not None
    # Dropping the newest entries is what the anchor is for.
    assert verify(tampered, _anchor(chain)) is not None


@given(_chains, st.data(), st.booleans())
def test_any_reorder_is_detected(chain: list[SealedEntry], data: st.DataObject, keep_seq: bool) -> None:
    assume(len(chain) >= 2)
    i = data.draw(st.integers(0, len(chain) - 2))
    j = data.draw(st.integers(i + 1, len(chain) - 1))
    tampered = list(chain)
    if keep_seq:
        # What an UPDATE swapping two rows' contents looks like: rows stay in seq order.
        tampered[i] = dataclasses.replace(chain[j], seq=chain[i].seq)
        tampered[j] = dataclasses.replace(chain[i], seq=chain[j].seq)
    else:
        tampered[i], tampered[j] = chain[j], chain[i]
    assert verify(tampered) is not None


_DRAFT_FIELDS = ("at", "action", "outcome", "actor", "tenant_id", "target", "detail")


@given(_chains, st.data(), _drafts, st.booleans())
def test_any_insertion_is_detected(chain: list[SealedEntry], data: st.DataObject, forged: object,
                                   well_formed: bool) -> None:
    i = data.draw(st.integers(0, len(chain) - 1), label="before index")
    prev_seq, prev_hash = (chain[i - 1].seq, chain[i - 1].hash) if i else (0, GENESIS)
    if well_formed:
        # Correctly linked and hashed after its predecessor: still breaks the entries after it.
        entry = seal(prev_seq, prev_hash, [forged])[0]  # type: ignore[list-item]
    else:
        entry = SealedEntry(seq=data.draw(st.integers(0, 20)), prev_hash=prev_hash, hash=GENESIS,
                            **{f: getattr(forged, f) for f in _DRAFT_FIELDS})
    assert verify([*chain[:i], entry, *chain[i:]]) is not None


def test_canonical_is_independent_of_detail_order() -> None:
    at = datetime(2025, 1, 1, tzinfo=UTC)
    a = draft(at, "a.b", detail={"x": 1, "y": 2})
    b = draft(at, "a.b", detail={"y": 2, "x": 1})
    assert canonical(1, a) == canonical(1, b)
    assert orjson.loads(canonical(1, a))["detail"] == {"x": 1, "y": 2}


async def test_auth_failures_are_counted_per_route_per_window() -> None:
    from skyfleet.audit.log import AuditLog
    from skyfleet.clock import ManualClock

    written: list = []

    class Appender:
        async def append(self, drafts):  # type: ignore[no-untyped-def]
            written.extend(drafts)
            return []

    audit = AuditLog(Appender(), ManualClock())
    for _ in range(1000):  # a flood of bad keys
        audit.record("auth.failure", actor=None, outcome="denied", target="GET /v1/models")
    audit.record("auth.failure", actor=None, outcome="denied", target="POST /v1/chat/completions")
    assert audit.pending == 0  # nothing queued per request
    await audit.flush()
    failures = {d.target: d for d in written if d.action == "auth.failure"}
    assert set(failures) == {"GET /v1/models", "POST /v1/chat/completions"}
    assert failures["GET /v1/models"].detail["count"] == 1000
