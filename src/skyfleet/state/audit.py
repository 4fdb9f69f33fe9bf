"""The audit log's table: appending to the hash chain (safely from many processes), reading it back.

Appending is optimistic: in one transaction read the newest (seq, hash), seal the new entries
after it (:func:`skyfleet.audit.chain.seal`) and insert them with explicit seq numbers. Two
writers that read the same head both try to insert ``seq + 1``; the primary key lets exactly one
commit and the other gets a uniqueness violation, rolls back, and tries again after the fresh
head (bounded, with jittered backoff). So the chain never forks, on PostgreSQL shared by several
gateways as on SQLite (where ``BEGIN IMMEDIATE`` already serialises writers).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from skyfleet.audit.chain import (
    GENESIS,
    Anchor,
    AuditDraft,
    ChainVerifier,
    SealedEntry,
    decode_detail,
    draft,
    encode_detail,
    seal,
)
from skyfleet.errors import ConflictError, ServiceUnavailableError
from skyfleet.state.access import Database
from skyfleet.state.models import AuditEntry, Tenant, utcnow

#: Tries of one append when other writers keep taking the next seq first.
APPEND_ATTEMPTS = 30
#: Rows per page when walking the whole log.
PAGE_SIZE = 1000
LIST_LIMIT_MAX = 1000


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored row that does not even decode (its detail is not a JSON object, say)."""

    seq: int
    why: str


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters of a listing, newest first. ``action`` ending in ``.*`` matches a prefix (``key.*``)."""

    tenant_ids: tuple[str, ...] | None = None
    action: str | None = None
    since: datetime | None = None
    before_seq: int | None = None
    limit: int = 100


_AGE_RE = re.compile(r"(\d{1,6})([smhd])", re.ASCII)
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time (UTC when it has no zone) or an age before ``now``: 30m, 12h, 7d."""
    text = text.strip()
    try:
        if m := _AGE_RE.fullmatch(text):
            return (now or utcnow()) - timedelta(**{_AGE_UNITS[m.group(2)]: int(m.group(1))})
        at = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise ValueError("give an ISO 8601 time (e.g. 2025-03-01T12:00:00Z) or an age (30m, 12h, 7d)") \
            from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _entry(row: Any) -> SealedEntry:
    return SealedEntry(seq=row.seq, at=row.at, action=row.action, outcome=row.outcome, actor=row.actor,
                       tenant_id=row.tenant_id, target=row.target, detail=decode_detail(row.detail),
                       prev_hash=row.prev_hash, hash=row.hash)


def _decoded(row: Any) -> SealedEntry | Unreadable:
    try:
        return _entry(row)
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        return Unreadable(row.seq, str(exc)[:200] or "undecodable row")


def _row(e: SealedEntry) -> dict[str, Any]:
    return {"seq": e.seq, "at": e.at, "action": e.action, "outcome": e.outcome, "actor": e.actor,
            "tenant_id": e.tenant_id, "target": e.target, "detail": encode_detail(e.detail),
            "prev_hash": e.prev_hash, "hash": e.hash}


def _columns() -> Select[Any]:
    return select(AuditEntry.seq, AuditEntry.at, AuditEntry.action, AuditEntry.outcome, AuditEntry.actor,
                  AuditEntry.tenant_id, AuditEntry.target, AuditEntry.detail, AuditEntry.prev_hash,
                  AuditEntry.hash)


class AuditRepository:
    def __init__(self, engine: AsyncEngine, *, attempts: int = APPEND_ATTEMPTS,
                 jitter: Callable[[float, float], float] = random.uniform) -> None:
        self._db = Database(engine)
        self._attempts = attempts
        self._jitter = jitter

    async def append(self, drafts: Sequence[AuditDraft]) -> list[SealedEntry]:
        """Append ``drafts`` in order, in one transaction; returns them sealed.

        Raises :class:`ServiceUnavailableError` if the store fails, or if other writers won the
        race for the next seq :data:`APPEND_ATTEMPTS` times in a row; nothing was written then.
        """
        if not drafts:
            return []
        for attempt in range(self._attempts):
            try:
                async with self._db.session(write=True) as session:
                    head = (await session.execute(
                        select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
                    )).one_or_none()
                    sealed = seal(head.seq, head.hash, drafts) if head else seal(0, GENESIS, drafts)
                    await session.execute(insert(AuditEntry), [_row(e) for e in sealed])
                return sealed
            except ConflictError:
                # Another writer took the seq: back off a little (jittered, growing) and re-read the head.
                await asyncio.sleep(self._jitter(0.0, min(0.1, 0.002 * 2**attempt)))
        raise ServiceUnavailableError("the audit log is too busy: could not append")

    async def record(
        self,
        action: str,
        *,
        actor: str | None,
        tenant_id: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        **detail: Any,
    ) -> SealedEntry:
        """Append one entry now (the synchronous path: the CLI, tests). Sanitised like every entry."""
        entry = draft(utcnow(), action, outcome=outcome, actor=actor, tenant_id=tenant_id, target=target,
                      detail=detail)
        return (await self.append([entry]))[0]

    async def head(self) -> Anchor | None:
        """The newest entry's (seq, hash): store it elsewhere to anchor the chain. None: empty log."""
        async with self._db.session() as session:
            row = (await session.execute(
                select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
            )).one_or_none()
        return None if row is None else Anchor(row.seq, row.hash)

    async def count(self) -> int:
        async with self._db.session() as session:
            return int((await session.execute(select(func.count()).select_from(AuditEntry))).scalar_one())

    async def pages(self, page_size: int = PAGE_SIZE) -> AsyncIterator[list[SealedEntry | Unreadable]]:
        """The whole log in seq order, ``page_size`` rows at a time (one short transaction per page)."""
        after = 0
        while True:
            async with self._db.session() as session:
                rows = (await session.execute(
                    _columns().where(AuditEntry.seq > after).order_by(AuditEntry.seq).limit(page_size)
                )).all()
            if not rows:
                return
            yield [_decoded(r) for r in rows]
            after = rows[-1].seq
            if len(rows) < page_size:
                return

    async def verify(
        self, anchor: Anchor | None = None, *, on_page: Callable[[int], None] | None = None
    ) -> ChainVerifier:
        """Walk the whole chain; the verifier's ``problem`` is the first break (None: intact).

        ``on_page(n)`` is called after each page with the number of rows it held (progress).
        """
        verifier = ChainVerifier(anchor)
        async for page in self.pages():
            for item in page:
                problem = (verifier.unreadable(item.seq, item.why) if isinstance(item, Unreadable)
                           else verifier.feed(item))
                if problem is not None:
                    return verifier
            if on_page is not None:
                on_page(len(page))
        verifier.finish()
        return verifier

    async def list(self, query: AuditQuery) -> tuple[list[SealedEntry | Unreadable], bool]:
        """Entries matching ``query``, newest first, and whether there are more (page on ``before_seq``)."""
        limit = max(1, min(query.limit, LIST_LIMIT_MAX))
        stmt = _columns().order_by(AuditEntry.seq.desc()).limit(limit + 1)
        if query.tenant_ids is not None:
            stmt = stmt.where(AuditEntry.tenant_id.in_(query.tenant_ids))
        if query.action:
            if query.action.endswith(".*"):
                prefix = query.action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                stmt = stmt.where(AuditEntry.action.like(prefix + "%", escape="\\"))
            else:
                stmt = stmt.where(AuditEntry.action == query.action)
        if query.since is not None:
            stmt = stmt.where(AuditEntry.at >= query.since)
        if query.before_seq is not None:
            stmt = stmt.where(AuditEntry.seq < query.before_seq)
        async with self._db.session() as session:
            rows = (await session.execute(stmt)).all()
        return [_decoded(r) for r in rows[:limit]], len(rows) > limit

    async def tenant_ids(self, name: str) -> tuple[str, ...]:
        """Ids of every tenant ever named ``name`` (a deleted tenant's entries stay listable)."""
        async with self._db.session() as session:
            return tuple((await session.execute(select(Tenant.id).where(Tenant.name == name))).scalars())

    async def tenant_names(self, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        async with self._db.session() as session:
            stmt = select(Tenant.id, Tenant.name).where(Tenant.id.in_(set(ids)))
            rows = (await session.execute(stmt)).all()
        return {r.id: r.name for r in rows}
