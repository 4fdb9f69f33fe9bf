"""Read-side queries for cost reports and right-sizing advice (usage records, replica intervals, samples).

Writes belong to the metering (``state/usage.py``); this module only reads, in short transactions,
and hands back plain frozen rows (never ORM objects), which the pure report and advice functions
take. Windows are half-open ``[start, end)``. The reads:

* :meth:`CostQueries.usage_page`: one page of usage records, newest first (``GET /admin/v1/usage``).
* :meth:`CostQueries.window`: everything the attribution of one window needs: the replica intervals
  that overlap it and the usage records that overlap it, from every tenant (a replica's cost is
  split over all the requests it served, so a tenant-scoped report still attributes over them all).
  :meth:`CostWindow.served_by` joins a usage record to the interval of the replica that served it.
* :meth:`CostQueries.sample_pages`: utilisation samples in time order, a page at a time (a month of
  samples of a large fleet does not fit in memory at once; the advice folds them as they come).

Usage records hold ids, token counts, timings and money: never a prompt, a completion or a key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from skyfleet.state.access import Database
from skyfleet.state.models import ApiKey, ReplicaInterval, ReplicaSample, Tenant, UsageRecord
from skyfleet.state.usage import STATIC_OWNER

#: Most records one usage page returns.
USAGE_LIMIT_MAX = 1000
#: Samples per page when walking a window.
SAMPLE_PAGE = 5000
#: An open interval whose heartbeat is older than this is taken to have ended at its last heartbeat
#: (its gateway died without closing it); a fresher one is running now.
STALE_HEARTBEAT = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class UsageRow:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    route: str
    replica_id: str | None
    pool: str | None
    status: str
    http_status: int
    started_at: datetime
    ended_at: datetime
    ttft_ms: int | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    charged_usd_micros: int
    #: The gateway instance that served it (``usage_records.owner``); None for records written
    #: before migration 0007.
    owner: str | None = None

    def json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "tenant_id": self.tenant_id, "key_id": self.key_id,
            "model": self.model, "route": self.route, "owner": self.owner, "replica_id": self.replica_id,
            "pool": self.pool, "status": self.status, "http_status": self.http_status,
            "started_at": self.started_at.isoformat(), "ended_at": self.ended_at.isoformat(),
            "ttft_ms": self.ttft_ms, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens, "charged_usd_micros": self.charged_usd_micros,
            "charged_usd": self.charged_usd_micros / 1e6,
        }


@dataclass(frozen=True, slots=True)
class IntervalRow:
    """A replica's life at one price (``ended_at`` None while it is open)."""

    id: str
    owner: str
    replica_id: str
    pool: str
    model: str
    engine: str
    instance_type: str | None
    region: str | None
    tier: str
    usd_per_hour: float
    started_at: datetime
    ended_at: datetime | None
    heartbeat_at: datetime

    def end_at(self, now: datetime, stale_after: timedelta = STALE_HEARTBEAT) -> datetime:
        """When the interval ended: ``ended_at``; if still open, ``now`` while its owner's heartbeat is
        fresh, else the last heartbeat (a crashed gateway's replica stops costing at its last sign)."""
        if self.ended_at is not None:
            return self.ended_at
        if now - self.heartbeat_at <= stale_after:
            return max(now, self.started_at)
        return max(self.heartbeat_at, self.started_at)


@dataclass(frozen=True, slots=True)
class SampleRow:
    owner: str
    replica_id: str
    at: datetime
    pool: str
    running: float | None
    waiting: float | None
    kv_cache_usage: float | None
    busy_fraction: float | None
    tokens_per_s: float | None


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Filters of a usage listing, newest first. ``tenant_ids`` None: every tenant."""

    since: datetime | None = None
    until: datetime | None = None
    tenant_ids: tuple[str, ...] | None = None
    model: str | None = None
    key_id: str | None = None
    #: The last request id of the previous page.
    after: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class CostWindow:
    """What attributing ``[start, end)`` needs, read at ``now``."""

    start: datetime
    end: datetime
    now: datetime
    intervals: tuple[IntervalRow, ...]
    usage: tuple[UsageRow, ...]

    def served_by(self) -> dict[str, IntervalRow | None]:
        """Request id -> the interval of the replica that served it (None: no interval covers it).

        A record with an ``owner`` joins exactly on (owner, replica id): the interval of its gateway's
        own replica, or the shared one of a static replica (owner ``static``), the one running when
        the request started (else the one it overlaps: intervals of one replica do not overlap).
        A record without (written before migration 0007) is matched the old way, a guess: an
        interval of the same replica id running when the request started; if several gateways ran
        a replica of that id then (local ids repeat: ``local-0``), the one of the same pool, else the
        earliest-started. Such a guess can give one gateway's request to another's replica.
        """
        by_replica: dict[str, list[IntervalRow]] = {}
        for iv in self.intervals:
            by_replica.setdefault(iv.replica_id, []).append(iv)
        return {u.request_id: _served_by(u, by_replica.get(u.replica_id or "", []), self.now)
                for u in self.usage}


def _served_by(u: UsageRow, same_id: Sequence[IntervalRow], now: datetime) -> IntervalRow | None:
    if u.replica_id is None:
        return None
    if u.owner is not None:
        # Its gateway's own replica first; a static replica's interval is shared (owner "static").
        mine = ([iv for iv in same_id if iv.owner == u.owner]
                + [iv for iv in same_id if iv.owner == STATIC_OWNER])
        covering = [iv for iv in mine if iv.started_at <= u.started_at <= iv.end_at(now)]
        overlapping = [iv for iv in mine if iv.started_at <= u.ended_at and u.started_at <= iv.end_at(now)]
        found = covering or overlapping
        return found[0] if found else None
    found = [iv for iv in same_id if iv.started_at <= u.started_at <= iv.end_at(now)]
    if len(found) > 1:
        found = [iv for iv in found if iv.pool == u.pool] or found
    return found[0] if found else None


class UnknownCursorError(ValueError):
    """``after`` names no usage record visible to the caller."""


_USAGE_COLUMNS = (UsageRecord.request_id, UsageRecord.tenant_id, UsageRecord.key_id, UsageRecord.model,
                  UsageRecord.route, UsageRecord.replica_id, UsageRecord.pool, UsageRecord.status,
                  UsageRecord.http_status, UsageRecord.started_at, UsageRecord.ended_at, UsageRecord.ttft_ms,
                  UsageRecord.prompt_tokens, UsageRecord.cached_tokens, UsageRecord.completion_tokens,
                  UsageRecord.charged_usd_micros, UsageRecord.owner)
_INTERVAL_COLUMNS = (ReplicaInterval.id, ReplicaInterval.owner, ReplicaInterval.replica_id, ReplicaInterval.pool,
                     ReplicaInterval.model, ReplicaInterval.engine, ReplicaInterval.instance_type,
                     ReplicaInterval.region, ReplicaInterval.tier, ReplicaInterval.usd_per_hour,
                     ReplicaInterval.started_at, ReplicaInterval.ended_at, ReplicaInterval.heartbeat_at)
_SAMPLE_COLUMNS = (ReplicaSample.owner, ReplicaSample.replica_id, ReplicaSample.at, ReplicaSample.pool,
                   ReplicaSample.running, ReplicaSample.waiting, ReplicaSample.kv_cache_usage,
                   ReplicaSample.busy_fraction, ReplicaSample.tokens_per_s)


def _usage(r: Any) -> UsageRow:
    return UsageRow(*r)


def _interval(r: Any) -> IntervalRow:
    return IntervalRow(*r)


def _sample(r: Any) -> SampleRow:
    return SampleRow(*r)


class CostQueries:
    def __init__(self, engine: AsyncEngine) -> None:
        self._db = Database(engine)

    async def usage_page(self, query: UsageQuery) -> tuple[list[UsageRow], bool]:
        """Records matching ``query`` (by ``ended_at`` in ``[since, until)``), newest first, and
        whether there are more; page with ``after`` = the last request id of the previous page.

        Raises :class:`UnknownCursorError` if ``after`` is not a record of the queried tenants.
        """
        limit = max(1, min(query.limit, USAGE_LIMIT_MAX))
        stmt = select(*_USAGE_COLUMNS).order_by(UsageRecord.ended_at.desc(), UsageRecord.request_id.desc())
        if query.tenant_ids is not None:
            stmt = stmt.where(UsageRecord.tenant_id.in_(query.tenant_ids))
        if query.model is not None:
            stmt = stmt.where(UsageRecord.model == query.model)
        if query.key_id is not None:
            stmt = stmt.where(UsageRecord.key_id == query.key_id)
        if query.since is not None:
            stmt = stmt.where(UsageRecord.ended_at >= query.since)
        if query.until is not None:
            stmt = stmt.where(UsageRecord.ended_at < query.until)
        async with self._db.session() as session:
            if query.after is not None:
                cursor = select(UsageRecord.ended_at).where(UsageRecord.request_id == query.after)
                if query.tenant_ids is not None:
                    cursor = cursor.where(UsageRecord.tenant_id.in_(query.tenant_ids))
                at = (await session.execute(cursor)).scalar_one_or_none()
                if at is None:
                    raise UnknownCursorError(query.after)
                stmt = stmt.where(or_(UsageRecord.ended_at < at,
                                      and_(UsageRecord.ended_at == at, UsageRecord.request_id < query.after)))
            rows = (await session.execute(stmt.limit(limit + 1))).all()
        return [_usage(r) for r in rows[:limit]], len(rows) > limit

    async def window(self, start: datetime, end: datetime, now: datetime) -> CostWindow:
        """The intervals and usage records overlapping ``[start, end)`` (every tenant), in one snapshot.

        An interval overlaps when it started before ``end`` and had not ended (see
        :meth:`IntervalRow.end_at`) by ``start``; a usage record when it started before ``end`` and
        ended at or after ``start``. Ordered by start time, then id (deterministic).
        """
        istmt = (select(*_INTERVAL_COLUMNS)
                 .where(ReplicaInterval.started_at < end,
                        or_(ReplicaInterval.ended_at.is_(None), ReplicaInterval.ended_at > start))
                 .order_by(ReplicaInterval.started_at, ReplicaInterval.id))
        ustmt = (select(*_USAGE_COLUMNS)
                 .where(UsageRecord.ended_at >= start, UsageRecord.started_at < end)
                 .order_by(UsageRecord.started_at, UsageRecord.request_id))
        async with self._db.session() as session:
            intervals = [_interval(r) for r in (await session.execute(istmt)).all()]
            usage = [_usage(r) for r in (await session.execute(ustmt)).all()]
        live = tuple(i for i in intervals if i.end_at(now) > start)
        return CostWindow(start=start, end=end, now=now, intervals=live, usage=tuple(usage))

    async def sample_pages(self, start: datetime, end: datetime,
                           page_size: int = SAMPLE_PAGE) -> AsyncIterator[list[SampleRow]]:
        """Samples taken in ``[start, end)``, ordered by (at, owner, replica_id), ``page_size`` at a time
        (keyset pages, one short transaction each)."""
        cursor: tuple[datetime, str, str] | None = None
        while True:
            stmt = (select(*_SAMPLE_COLUMNS).where(ReplicaSample.at >= start, ReplicaSample.at < end)
                    .order_by(ReplicaSample.at, ReplicaSample.owner, ReplicaSample.replica_id).limit(page_size))
            if cursor is not None:
                at, owner, replica = cursor
                stmt = stmt.where(or_(
                    ReplicaSample.at > at,
                    and_(ReplicaSample.at == at, ReplicaSample.owner > owner),
                    and_(ReplicaSample.at == at, ReplicaSample.owner == owner, ReplicaSample.replica_id > replica)))
            async with self._db.session() as session:
                rows = [_sample(r) for r in (await session.execute(stmt)).all()]
            if not rows:
                return
            yield rows
            if len(rows) < page_size:
                return
            last = rows[-1]
            cursor = (last.at, last.owner, last.replica_id)

    async def tenant_ids(self, name: str) -> tuple[str, ...]:
        """Ids of every tenant ever named ``name`` (a deleted tenant's usage stays reportable)."""
        async with self._db.session() as session:
            return tuple((await session.execute(select(Tenant.id).where(Tenant.name == name))).scalars())

    async def tenant_names(self, ids: Iterable[str]) -> dict[str, str]:
        wanted = set(ids)
        if not wanted:
            return {}
        async with self._db.session() as session:
            rows = (await session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(wanted)))).all()
        return {r.id: r.name for r in rows}

    async def key_names(self, ids: Sequence[str]) -> dict[str, str]:
        """Key id -> the key's name, for keys that have one (never the key or its hash)."""
        wanted = set(ids)
        if not wanted:
            return {}
        async with self._db.session() as session:
            rows = (await session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(wanted)))).all()
        return {r.id: r.name for r in rows if r.name}
