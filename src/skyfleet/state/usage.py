"""Writes of the metering: usage records, replica cost intervals, utilisation samples.

Plain async functions over an engine (usable from the gateway and from a CLI process alike).
Every insert is idempotent: ``INSERT ... ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL (a
usage record per request id, an interval per (owner, replica id, start), a sample per (owner,
replica id, time)), so a batch retried after an unclear failure never counts twice. Reads for
reports are in :mod:`skyfleet.state.cost_queries`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from skyfleet.state.access import Database
from skyfleet.state.models import ReplicaInterval, ReplicaSample, UsageRecord

#: Rows per INSERT statement (17 columns x 1000 stays under SQLite's and asyncpg's bind limits of 32766).
_ROWS_PER_STATEMENT = 1000

#: The owner of intervals of configured external replicas, shared by every gateway listing them.
STATIC_OWNER = "static"

#: ``owner`` is the gateway instance that served the request (the owner of its local replicas' intervals);
#: None for records written before migration 0007.
USAGE_COLUMNS = ("request_id", "tenant_id", "key_id", "model", "route", "owner", "replica_id", "pool",
                 "status", "http_status", "started_at", "ended_at", "ttft_ms", "prompt_tokens", "cached_tokens",
                 "completion_tokens", "charged_usd_micros")


def _insert(session: AsyncSession, table: Any) -> Any:
    name = session.bind.dialect.name if session.bind is not None else "sqlite"
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(table)


async def _insert_ignoring(engine: AsyncEngine, table: Any, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert ``rows``, skipping any whose key exists; the number inserted."""
    if not rows:
        return 0
    inserted = 0
    async with Database(engine).session(write=True) as session:
        for i in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = list(rows[i:i + _ROWS_PER_STATEMENT])
            result = await session.execute(_insert(session, table).values(chunk).on_conflict_do_nothing())
            inserted += max(0, result.rowcount or 0)
    return inserted


async def insert_usage(engine: AsyncEngine, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert usage records (dicts of :data:`USAGE_COLUMNS`); a request id already stored is skipped.

    Returns how many were new. Raises :class:`~skyfleet.errors.ServiceUnavailableError` if the
    store is unreachable (nothing is written then: one transaction).
    """
    unique = list({r["request_id"]: r for r in rows}.values())
    return await _insert_ignoring(engine, UsageRecord.__table__, unique)


@dataclass(frozen=True, slots=True)
class IntervalSpec:
    """A replica interval to open: who runs the replica, what it is, its price."""

    owner: str
    replica_id: str
    pool: str
    model: str
    engine: str
    instance_type: str | None
    region: str | None
    tier: str
    usd_per_hour: float


def _interval_row(iid: str, spec: IntervalSpec, at: datetime) -> dict[str, Any]:
    return {"id": iid, "owner": spec.owner, "replica_id": spec.replica_id, "pool": spec.pool, "model": spec.model,
            "engine": spec.engine, "instance_type": spec.instance_type, "region": spec.region, "tier": spec.tier,
            "usd_per_hour": spec.usd_per_hour, "started_at": at, "ended_at": None, "heartbeat_at": at}


async def open_interval(engine: AsyncEngine, iid: str, spec: IntervalSpec, at: datetime) -> None:
    """Open an interval (idempotent on (owner, replica id, start) and on ``iid``)."""
    await _insert_ignoring(engine, ReplicaInterval.__table__, [_interval_row(iid, spec, at)])


async def adopt_static_interval(engine: AsyncEngine, iid: str, spec: IntervalSpec, at: datetime,
                                fresh_after: datetime) -> str:
    """The open interval of a static replica that every gateway listing it shares; the id to heartbeat.

    A static replica's cost must count once however many gateways route to it. This gateway opens
    ``iid`` unless an open interval of the same replica at the same price has a heartbeat after
    ``fresh_after``; when several exist (gateways starting together), the earliest (then lowest
    id) is kept and the others are deleted, by whoever sees them. A gateway whose adopted interval
    disappears (its heartbeat updates nothing) adopts again.
    """
    same = and_(ReplicaInterval.owner == spec.owner, ReplicaInterval.replica_id == spec.replica_id,
                ReplicaInterval.ended_at.is_(None), ReplicaInterval.heartbeat_at > fresh_after,
                ReplicaInterval.usd_per_hour == spec.usd_per_hour, ReplicaInterval.tier == spec.tier)
    db = Database(engine)
    async with db.session() as session:
        found = (await session.execute(select(ReplicaInterval.id).where(same)
                                       .order_by(ReplicaInterval.started_at, ReplicaInterval.id).limit(1))).first()
    if found is None:
        await open_interval(engine, iid, spec, at)
    async with db.session(write=True) as session:
        ids = [r[0] for r in (await session.execute(
            select(ReplicaInterval.id).where(same).order_by(ReplicaInterval.started_at, ReplicaInterval.id))).all()]
        if not ids:  # ours was just superseded and deleted by another gateway's view: open again next time
            return iid
        keep, extra = ids[0], ids[1:]
        if extra:
            await session.execute(delete(ReplicaInterval).where(ReplicaInterval.id.in_(extra)))
    return keep


async def heartbeat(engine: AsyncEngine, ids: Iterable[str], at: datetime) -> set[str]:
    """Refresh the heartbeat of these open intervals; the ids that were still there and open."""
    wanted = list(ids)
    if not wanted:
        return set()
    async with Database(engine).session(write=True) as session:
        await session.execute(update(ReplicaInterval)
                              .where(ReplicaInterval.id.in_(wanted), ReplicaInterval.ended_at.is_(None))
                              .values(heartbeat_at=at))
        rows = (await session.execute(select(ReplicaInterval.id).where(
            ReplicaInterval.id.in_(wanted), ReplicaInterval.ended_at.is_(None)))).all()
    return {r[0] for r in rows}


async def close_intervals(engine: AsyncEngine, ids: Iterable[str], at: datetime) -> None:
    """Close these intervals at ``at`` (never before their start; closed ones stay as they are)."""
    wanted = list(ids)
    if not wanted:
        return
    async with Database(engine).session(write=True) as session:
        rows = (await session.execute(select(ReplicaInterval.id, ReplicaInterval.started_at).where(
            ReplicaInterval.id.in_(wanted), ReplicaInterval.ended_at.is_(None)))).all()
        for iid, started in rows:
            end = max(at, started)
            await session.execute(update(ReplicaInterval).where(ReplicaInterval.id == iid)
                                  .values(ended_at=end, heartbeat_at=end))


async def close_stale_intervals(engine: AsyncEngine, *, heartbeat_before: datetime) -> int:
    """Close open intervals whose heartbeat stopped before ``heartbeat_before`` (their gateway died)
    at that last heartbeat. Returns how many were closed."""
    async with Database(engine).session(write=True) as session:
        result = await session.execute(
            update(ReplicaInterval)
            .where(ReplicaInterval.ended_at.is_(None), ReplicaInterval.heartbeat_at < heartbeat_before)
            .values(ended_at=ReplicaInterval.heartbeat_at))
    return max(0, result.rowcount or 0)


async def insert_samples(engine: AsyncEngine, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert utilisation samples (``replica_samples`` columns); duplicates of (owner, replica, at) skipped."""
    return await _insert_ignoring(engine, ReplicaSample.__table__, rows)
