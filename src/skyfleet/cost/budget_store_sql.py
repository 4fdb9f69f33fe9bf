"""Budgets in the state store: the definitions (always here) and the SQL counter backend.

:class:`BudgetRepository`: create, list, change and delete budgets (one per tenant or key and
period). :class:`SqlBudgetCounters`: the :class:`~skyfleet.cost.budgets.BudgetBackend` on the
store's database (PostgreSQL, shared by every gateway on it, or SQLite for one gateway):

* ``reserve``: one transaction; per counter (in a fixed order, so concurrent transactions cannot
  deadlock) one conditional ``UPDATE budget_counters SET reserved = reserved + :amount WHERE
  spent + reserved + :amount <= (the budget's current hard limit) RETURNING``; a counter row that
  does not exist yet is inserted (``ON CONFLICT DO NOTHING``) and the UPDATE repeated. On
  PostgreSQL a concurrent UPDATE of the same row waits for the row lock and re-checks the
  condition against the committed row, so the check and the increment are one atomic step; on
  SQLite ``BEGIN IMMEDIATE`` serialises the transactions. Any refusal rolls everything back.
  The reservation rows (one per counter, with their expiry) are inserted in the same transaction.
* ``settle``: per counter, ``DELETE`` the reservation row ``RETURNING`` its amount (absent: the
  sweeper released it already, so it is not released twice), then add the actual charge to
  ``spent`` and subtract the released amount from ``reserved``; a conditional ``UPDATE ... SET
  alerted_at WHERE alerted_at IS NULL AND spent >= soft limit RETURNING`` elects the one gateway
  that sends the soft-limit alert. Batched: many settlements per transaction.
* ``release_expired``: ``DELETE`` expired reservation rows ``RETURNING`` them and subtract their
  amounts, in one transaction (any number of gateways may run it at once).

Database errors leave as :class:`~skyfleet.cost.budgets.BudgetUnavailableError` (counters) or as
errors of :mod:`skyfleet.errors` (definitions, like the other repositories).
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, and_, delete, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from skyfleet.cost.budgets import (
    BudgetDef,
    BudgetUnavailableError,
    CounterRef,
    CounterState,
    Crossing,
    ReserveLine,
    Settlement,
    check_period,
)
from skyfleet.errors import ConflictError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from skyfleet.state.db import WRITE_OPTIONS
from skyfleet.state.models import ApiKey, Budget, BudgetCounter, BudgetReservation, Tenant, new_id, utcnow

BUDGET_ID_PREFIX = "bud_"
#: "No hard limit" inside the reserving statement (larger than any amount a budget takes).
_NO_LIMIT = 2**62
_B = Budget.__table__
_C = BudgetCounter.__table__
_R = BudgetReservation.__table__


def _def(row: Any) -> BudgetDef:
    return BudgetDef(id=row.id, tenant_id=row.tenant_id, key_id=row.key_id, period=check_period(row.period),
                     soft_limit_usd_micros=row.soft_limit_usd_micros, hard_limit_usd_micros=row.hard_limit_usd_micros,
                     created_at=row.created_at, updated_at=row.updated_at)


def check_limits(soft: int | None, hard: int | None) -> None:
    if soft is None and hard is None:
        raise InvalidRequestError("A budget needs a soft limit, a hard limit, or both.", param="hard_limit_usd")
    if soft is not None and hard is not None and soft > hard:
        raise InvalidRequestError("The soft limit must not be above the hard limit.", param="soft_limit_usd")


class BudgetRepository:
    """Budget definitions. Values are validated by the callers' schemas; ids and limits again here."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @asynccontextmanager
    async def _conn(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        engine = self._engine.execution_options(**WRITE_OPTIONS) if write else self._engine
        try:
            async with engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise ConflictError("That tenant or key already has a budget for this period; change it "
                                "instead (PATCH).") from None
        except (SQLAlchemyError, OSError) as exc:
            raise ServiceUnavailableError("the state store is unavailable") from exc

    async def create(self, *, tenant_id: str, key_id: str | None, period: str, soft_limit_usd_micros: int | None,
                     hard_limit_usd_micros: int | None) -> BudgetDef:
        check_period(period)
        check_limits(soft_limit_usd_micros, hard_limit_usd_micros)
        now = utcnow()
        values = {"id": new_id(BUDGET_ID_PREFIX), "tenant_id": tenant_id, "key_id": key_id,
                  "subject": key_id or "tenant", "period": period, "soft_limit_usd_micros": soft_limit_usd_micros,
                  "hard_limit_usd_micros": hard_limit_usd_micros, "created_at": now, "updated_at": now}
        async with self._conn(write=True) as conn:
            await conn.execute(insert(_B).values(**values))
        return _def(type("Row", (), values))

    async def get(self, budget_id: str) -> BudgetDef:
        if isinstance(budget_id, str) and len(budget_id) <= 32:
            async with self._conn() as conn:
                row = (await conn.execute(select(_B).where(_B.c.id == budget_id))).one_or_none()
            if row is not None:
                return _def(row)
        raise NotFoundError(f"budget '{str(budget_id)[:64]}' not found", param="budget_id")

    async def list(self, *, tenant_id: str | None = None) -> builtins.list[BudgetDef]:
        stmt = select(_B).order_by(_B.c.tenant_id, _B.c.subject, _B.c.period)
        if tenant_id is not None:
            stmt = stmt.where(_B.c.tenant_id == tenant_id)
        async with self._conn() as conn:
            return [_def(r) for r in await conn.execute(stmt)]

    async def for_tenant(self, tenant_id: str) -> tuple[BudgetDef, ...]:
        """Every budget of a tenant (its own and its keys'): what the request path caches."""
        return tuple(await self.list(tenant_id=tenant_id))

    async def update(self, budget_id: str, changes: dict[str, int | None]) -> BudgetDef:
        """Change the soft and/or hard limit (None clears one); the result must keep at least one."""
        current = await self.get(budget_id)
        soft = changes.get("soft_limit_usd_micros", current.soft_limit_usd_micros)
        hard = changes.get("hard_limit_usd_micros", current.hard_limit_usd_micros)
        check_limits(soft, hard)
        async with self._conn(write=True) as conn:
            done = await conn.execute(update(_B).where(_B.c.id == budget_id).values(
                soft_limit_usd_micros=soft, hard_limit_usd_micros=hard, updated_at=utcnow()))
        if done.rowcount != 1:
            raise NotFoundError(f"budget '{budget_id[:64]}' not found", param="budget_id")
        return await self.get(budget_id)

    async def delete(self, budget_id: str) -> BudgetDef:
        current = await self.get(budget_id)
        async with self._conn(write=True) as conn:
            await conn.execute(delete(_B).where(_B.c.id == budget_id))  # counters and reservations cascade
        return current

    async def tenant_by_name(self, name: str) -> tuple[str, str] | None:
        """(id, name) of a live tenant."""
        async with self._conn() as conn:
            row = (await conn.execute(select(Tenant.id, Tenant.name).where(
                Tenant.name == name, Tenant.deleted_at.is_(None)))).one_or_none()
        return (row.id, row.name) if row is not None else None

    async def names(self, tenant_ids: Sequence[str]) -> dict[str, str]:
        """tenant id -> name, for display."""
        if not tenant_ids:
            return {}
        async with self._conn() as conn:
            rows = await conn.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(set(tenant_ids))))
            return {r.id: r.name for r in rows}

    async def key_owner(self, key_id: str) -> tuple[str, str] | None:
        """(tenant id, role) of an API key, revoked or not."""
        if not isinstance(key_id, str) or len(key_id) > 32:
            return None
        async with self._conn() as conn:
            row = (await conn.execute(select(ApiKey.tenant_id, ApiKey.role).where(ApiKey.id == key_id))).one_or_none()
        return (row.tenant_id, row.role) if row is not None else None


# -- the counters ----------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _hard_limit(budget_id: str) -> Any:
    limit = select(_B.c.hard_limit_usd_micros).where(_B.c.id == budget_id).scalar_subquery()
    return func.coalesce(limit, literal(_NO_LIMIT, BigInteger()))


def _where(counter: CounterRef) -> Any:
    return and_(_C.c.budget_id == counter.budget_id, _C.c.period_start == counter.period_start)


class SqlBudgetCounters:
    """The counters in the store's database (see the module docstring for the statements)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.execution_options(**WRITE_OPTIONS)
        self._read_engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        try:
            async with (self._engine if write else self._read_engine).begin() as conn:
                yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise BudgetUnavailableError(type(exc).__name__) from exc

    async def _ensure(self, conn: AsyncConnection, counter: CounterRef) -> None:
        await conn.execute(self._insert(_C).values(
            budget_id=counter.budget_id, period_start=counter.period_start, spent_usd_micros=0,
            reserved_usd_micros=0, alerted_at=None).on_conflict_do_nothing())

    async def reserve(self, lines: Sequence[ReserveLine], reservation_id: str, *, now: datetime,
                      expires_at: datetime) -> int | None:
        order = sorted(range(len(lines)), key=lambda i: (lines[i].counter.budget_id, lines[i].counter.period_start))
        try:
            async with self._tx() as conn:
                for i in order:
                    line = lines[i]
                    amount = literal(line.amount, BigInteger())
                    stmt = (update(_C).where(
                        _where(line.counter),
                        _C.c.spent_usd_micros + _C.c.reserved_usd_micros + amount
                        <= _hard_limit(line.counter.budget_id))
                        .values(reserved_usd_micros=_C.c.reserved_usd_micros + amount)
                        .returning(_C.c.spent_usd_micros))
                    if (await conn.execute(stmt)).first() is None:
                        await self._ensure(conn, line.counter)
                        if (await conn.execute(stmt)).first() is None:
                            raise _Refused(i)  # rolls the whole transaction back
                await conn.execute(insert(_R), [
                    {"id": reservation_id, "budget_id": line.counter.budget_id,
                     "period_start": line.counter.period_start, "amount_usd_micros": line.amount,
                     "expires_at": expires_at} for line in lines])
        except _Refused as refused:
            return refused.index
        return None

    async def settle(self, settlements: Sequence[Settlement], *, now: datetime) -> list[Crossing]:
        crossings: list[Crossing] = []
        async with self._tx() as conn:
            for s in settlements:
                for line in sorted(s.lines, key=lambda ln: (ln.counter.budget_id, ln.counter.period_start)):
                    c = line.counter
                    held = (await conn.execute(delete(_R).where(
                        _R.c.id == s.reservation_id, _R.c.budget_id == c.budget_id)
                        .returning(_R.c.amount_usd_micros))).scalar_one_or_none() or 0
                    if held == 0 and s.actual == 0:
                        continue
                    stmt = update(_C).where(_where(c)).values(
                        spent_usd_micros=_C.c.spent_usd_micros + literal(s.actual, BigInteger()),
                        reserved_usd_micros=_C.c.reserved_usd_micros - literal(held, BigInteger()))
                    if (await conn.execute(stmt)).rowcount == 0:  # its budget was deleted meanwhile
                        continue
                    if s.actual == 0:
                        continue
                    soft = select(_B.c.soft_limit_usd_micros).where(_B.c.id == c.budget_id).scalar_subquery()
                    won = (await conn.execute(update(_C).where(
                        _where(c), _C.c.alerted_at.is_(None), _C.c.spent_usd_micros >= soft)
                        .values(alerted_at=now).returning(_C.c.spent_usd_micros))).first()
                    if won is not None:
                        limit = (await conn.execute(select(_B.c.soft_limit_usd_micros).where(
                            _B.c.id == c.budget_id))).scalar_one_or_none()
                        crossings.append(Crossing(c, int(won[0]), limit))
        return crossings

    async def release_expired(self, *, now: datetime) -> int:
        async with self._tx() as conn:
            rows = (await conn.execute(delete(_R).where(_R.c.expires_at < now).returning(
                _R.c.budget_id, _R.c.period_start, _R.c.amount_usd_micros))).all()
            totals: dict[tuple[str, datetime], int] = {}
            for r in rows:
                totals[(r.budget_id, r.period_start)] = totals.get((r.budget_id, r.period_start), 0) + r.amount_usd_micros
            for (budget_id, start), amount in sorted(totals.items()):
                await conn.execute(update(_C).where(_C.c.budget_id == budget_id, _C.c.period_start == start).values(
                    reserved_usd_micros=_C.c.reserved_usd_micros - literal(amount, BigInteger())))
        return len(rows)

    async def state(self, counters: Sequence[CounterRef], *, now: datetime) -> dict[CounterRef, CounterState]:
        if not counters:
            return {}
        async with self._tx(write=False) as conn:
            rows = await conn.execute(select(_C.c.budget_id, _C.c.period_start, _C.c.spent_usd_micros,
                                             _C.c.reserved_usd_micros).where(or_(*(_where(c) for c in counters))))
            found = {(r.budget_id, r.period_start): CounterState(r.spent_usd_micros, r.reserved_usd_micros)
                     for r in rows}
        return {c: found[(c.budget_id, c.period_start)] for c in counters if (c.budget_id, c.period_start) in found}

    async def forget(self, budget: BudgetDef) -> None:
        return None  # the budget's rows cascade with it

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
