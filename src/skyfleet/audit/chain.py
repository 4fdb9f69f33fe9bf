"""The audit log's hash chain: entry encoding, sealing and verification. Pure functions, no I/O.

Canonical form of an entry (what is hashed), version 1::

    canonical(e) = orjson.dumps({
        "action": str, "actor": str | null, "at": "YYYY-MM-DDTHH:MM:SS.ffffffZ",
        "detail": {name: str | int | float | bool | null, ...},   # {} when there is none
        "outcome": str, "seq": int, "target": str | null, "tenant_id": str | null,
    }, option=OPT_SORT_KEYS)

that is: compact UTF-8 JSON, keys sorted (also inside ``detail``), ``at`` in RFC 3339 UTC with
exactly six fractional digits and a ``Z``. Then::

    hash(e) = sha256(prev_hash || canonical(e)).hexdigest()

where ``prev_hash`` is the previous entry's ``hash`` as 64 lowercase hex ASCII characters, and
:data:`GENESIS` (64 zeros) before the entry with seq 1. Sequence numbers start at 1 and have no
gaps.

What the chain proves: an entry changed in place (its own hash no longer matches), a row deleted
(a gap in ``seq``), rows re-ordered or inserted (the seq is inside the hash, and each entry names
its predecessor's hash). What it cannot prove on its own: someone with write access to the
database can rewrite the whole tail from any point on, or drop the newest entries, and produce a
chain that verifies. Only a head hash stored elsewhere (an *anchor*: ``skyfleet audit head``)
detects that: :meth:`ChainVerifier.finish` checks the chain against one.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from skyfleet.audit import DetailValue

GENESIS = "0" * 64

#: Longest string kept in ``detail`` (longer ones are cut and marked with a trailing "…").
MAX_DETAIL_STRING = 200
#: Most names kept in ``detail``.
MAX_DETAIL_ITEMS = 32
#: Column widths of the ``audit_log`` table.
MAX_ACTION, MAX_OUTCOME, MAX_ACTOR, MAX_TENANT_ID, MAX_TARGET = 64, 16, 80, 32, 200
REDACTED = "[redacted]"

_DETAIL_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)
_ACTION_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}", re.ASCII)
_HASH_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
#: Detail names that suggest a secret or private text: their string values are dropped (numbers such
#: as ``prompt_tokens`` and ``*_id`` names are kept).
_FORBIDDEN_NAMES = ("key", "token", "secret", "password", "authorization", "prompt", "completion",
                    "content", "message", "input", "output", "cookie")
#: Anything that looks like an API key (``sk-sf-``, or any ``sk-``) or a JWT is never stored.
_SECRET_RE = re.compile(r"sk-sf-|\bsk-[A-Za-z0-9_-]{16,}|eyJ[A-Za-z0-9_-]{8,}\.eyJ", re.IGNORECASE)
_INT_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """An entry before it has a place in the chain (already sanitised: see :func:`draft`)."""

    at: datetime
    action: str
    outcome: str = "ok"
    actor: str | None = None
    tenant_id: str | None = None
    target: str | None = None
    detail: Mapping[str, DetailValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SealedEntry:
    """An entry with its place in the chain (``seq``) and its hashes, as stored."""

    seq: int
    at: datetime
    action: str
    outcome: str
    actor: str | None
    tenant_id: str | None
    target: str | None
    detail: Mapping[str, DetailValue]
    prev_hash: str
    hash: str

    def json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": format_at(self.at), "action": self.action, "outcome": self.outcome,
                "actor": self.actor, "tenant_id": self.tenant_id, "target": self.target,
                "detail": dict(self.detail), "prev_hash": self.prev_hash, "hash": self.hash}


# -- sanitising: nothing secret, nothing long, scalars only --


def clean_text(value: str, limit: int) -> str:
    """``value`` without NULs or unencodable characters, at most ``limit`` long; redacted if secret-like."""
    if _SECRET_RE.search(value):
        return REDACTED
    value = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _clean_value(value: Any) -> DetailValue:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT_MAX <= value <= _INT_MAX else str(value)[:MAX_DETAIL_STRING]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return clean_text(value, MAX_DETAIL_STRING)
    return None  # not a scalar: refused (kept as null so its absence is visible)


def clean_detail(detail: Mapping[str, Any]) -> dict[str, DetailValue]:
    """Scalars only, under valid names; secret-looking names dropped, secret-looking values redacted."""
    out: dict[str, DetailValue] = {}
    for name, value in detail.items():
        if len(out) >= MAX_DETAIL_ITEMS:
            break
        if not isinstance(name, str) or _DETAIL_NAME_RE.fullmatch(name) is None:
            continue
        suspicious = not name.endswith("_id") and any(bad in name for bad in _FORBIDDEN_NAMES)
        if suspicious and isinstance(value, str):
            continue
        out[name] = _clean_value(value)
    return out


def _optional(value: Any, limit: int) -> str | None:
    return None if value is None else clean_text(str(value), limit)


def draft(
    at: datetime,
    action: str,
    *,
    outcome: str = "ok",
    actor: str | None = None,
    tenant_id: str | None = None,
    target: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> AuditDraft:
    """A sanitised :class:`AuditDraft`. ``at`` must be timezone-aware; it is kept to the microsecond."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("audit timestamps must be timezone-aware")
    if not isinstance(action, str) or _ACTION_RE.fullmatch(action) is None:
        action = "invalid"
    return AuditDraft(
        at=at.astimezone(UTC),
        action=action,
        outcome=_optional(outcome, MAX_OUTCOME) or "ok",
        actor=_optional(actor, MAX_ACTOR),
        tenant_id=_optional(tenant_id, MAX_TENANT_ID),
        target=_optional(target, MAX_TARGET),
        detail=clean_detail(detail or {}),
    )


# -- encoding and hashing --


def format_at(at: datetime) -> str:
    """RFC 3339, UTC, microseconds: ``2025-03-01T12:00:00.000000Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_detail(detail: Mapping[str, DetailValue]) -> str | None:
    """How ``detail`` is stored in its TEXT column (None when empty)."""
    return orjson.dumps(dict(detail), option=orjson.OPT_SORT_KEYS).decode() if detail else None


def decode_detail(text: str | None) -> dict[str, DetailValue]:
    """The stored ``detail`` column back; ValueError if it is not a JSON object of scalars."""
    if text is None:
        return {}
    value = orjson.loads(text)
    if not isinstance(value, dict) or any(isinstance(v, dict | list) for v in value.values()):
        raise ValueError("detail is not a JSON object of scalars")
    return value


def canonical(seq: int, entry: AuditDraft | SealedEntry) -> bytes:
    """The bytes that are hashed (see the module docstring)."""
    return orjson.dumps(
        {
            "action": entry.action,
            "actor": entry.actor,
            "at": format_at(entry.at),
            "detail": dict(entry.detail),
            "outcome": entry.outcome,
            "seq": seq,
            "target": entry.target,
            "tenant_id": entry.tenant_id,
        },
        option=orjson.OPT_SORT_KEYS,
    )


def entry_hash(prev_hash: str, seq: int, entry: AuditDraft | SealedEntry) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(seq, entry)).hexdigest()


def seal(last_seq: int, last_hash: str, drafts: Iterable[AuditDraft]) -> list[SealedEntry]:
    """Chain ``drafts`` after the entry (``last_seq``, ``last_hash``); (0, GENESIS) for an empty log."""
    out: list[SealedEntry] = []
    seq, prev = last_seq, last_hash
    for d in drafts:
        seq += 1
        digest = entry_hash(prev, seq, d)
        out.append(SealedEntry(seq=seq, at=d.at, action=d.action, outcome=d.outcome, actor=d.actor,
                               tenant_id=d.tenant_id, target=d.target, detail=d.detail, prev_hash=prev,
                               hash=digest))
        prev = digest
    return out


# -- verification --


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain: the seq where it breaks, what kind of break, and a sentence."""

    seq: int
    kind: str  # "modified" | "missing" | "broken-link" | "out-of-order" | "anchor"
    message: str


@dataclass(frozen=True, slots=True)
class Anchor:
    """A head stored elsewhere: entry ``seq`` must exist and have hash ``hash``."""

    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``SEQ:HASH`` (what ``skyfleet audit head`` prints)."""
        seq, sep, digest = text.strip().partition(":")
        if not sep or not seq.isdigit() or int(seq) < 1 or _HASH_RE.fullmatch(digest) is None:
            raise ValueError("an anchor is SEQ:HASH, e.g. 42:3f5a… (64 hex digits)")
        return cls(int(seq), digest)

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


class ChainVerifier:
    """Walks a chain entry by entry, in seq order, keeping only the last (seq, hash).

    :meth:`feed` returns the first :class:`Problem` found (and every later call returns it too);
    :meth:`finish` adds the checks that need the whole chain (the anchor).
    """

    def __init__(self, anchor: Anchor | None = None) -> None:
        self.count = 0
        self.last_seq = 0
        self.last_hash = GENESIS
        self.problem: Problem | None = None
        self._anchor = anchor

    def feed(self, entry: SealedEntry) -> Problem | None:
        if self.problem is None:
            self.problem = self._check(entry)
            if self.problem is None:
                self.count += 1
                self.last_seq, self.last_hash = entry.seq, entry.hash
        return self.problem

    def _check(self, e: SealedEntry) -> Problem | None:
        expected = self.last_seq + 1
        if e.seq < expected:
            return Problem(e.seq, "out-of-order", f"seq {e.seq} appears after seq {self.last_seq}")
        if e.seq > expected:
            following = f"the next entry is seq {e.seq}"
            return Problem(expected, "missing", f"seq {expected} is missing ({following})")
        try:
            digest = entry_hash(e.prev_hash, e.seq, e)
        except (TypeError, ValueError):  # a stored value no entry could hold (an int over 64 bits, …)
            digest = None
        if e.hash != digest:
            return Problem(e.seq, "modified", f"seq {e.seq} was modified: its hash does not match its "
                                              "contents")
        if e.prev_hash != self.last_hash:
            before = "the genesis hash" if e.seq == 1 else f"seq {self.last_seq}'s hash"
            return Problem(e.seq, "broken-link", f"seq {e.seq} does not link to {before} (an entry before it "
                                                 "was replaced, or the chain was re-ordered)")
        if self._anchor is not None and e.seq == self._anchor.seq and e.hash != self._anchor.hash:
            return Problem(e.seq, "anchor", f"seq {e.seq} does not match the anchor: the log was rewritten "
                                            "from this entry or earlier")
        return None

    def unreadable(self, seq: int, why: str) -> Problem:
        """Record that the row at ``seq`` could not even be decoded (counts as modified)."""
        if self.problem is None:
            expected = self.last_seq + 1
            if seq > expected:
                self.problem = Problem(expected, "missing",
                                       f"seq {expected} is missing (the next entry is seq {seq})")
            else:
                self.problem = Problem(seq, "modified", f"seq {seq} was modified: {why}")
        return self.problem

    def finish(self) -> Problem | None:
        if self.problem is None and self._anchor is not None and self.last_seq < self._anchor.seq:
            self.problem = Problem(self.last_seq + 1, "anchor",
                                   f"the log ends at seq {self.last_seq} but the anchor is seq "
                                   f"{self._anchor.seq}: newer entries were deleted")
        return self.problem


def verify(entries: Iterable[SealedEntry], anchor: Anchor | None = None) -> Problem | None:
    """The first problem of a whole chain (in seq order, as stored), or None if it is intact."""
    verifier = ChainVerifier(anchor)
    for e in entries:
        if verifier.feed(e) is not None:
            break
    return verifier.finish()
