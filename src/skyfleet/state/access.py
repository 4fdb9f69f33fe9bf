"""Transactions over an engine or a session factory, with database errors mapped to ours."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from skyfleet.clock import Clock
from skyfleet.errors import ConflictError, ServiceUnavailableError
from skyfleet.state.db import WRITE_OPTIONS, make_session_factory

SessionSource = AsyncEngine | async_sessionmaker[AsyncSession]


class Database:
    """One-transaction sessions. Writes start with ``BEGIN IMMEDIATE`` on SQLite."""

    def __init__(self, source: SessionSource) -> None:
        self.factory = make_session_factory(source) if isinstance(source, AsyncEngine) else source

    @asynccontextmanager
    async def session(
        self, *, write: bool = False, conflict: str = "conflict"
    ) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction, committed on success.

        A uniqueness or foreign-key violation leaves as :class:`ConflictError` (``conflict``),
        any other database failure as :class:`ServiceUnavailableError`.
        """
        try:
            async with self.factory() as session, session.begin():
                if write:
                    await session.connection(execution_options=WRITE_OPTIONS)
                yield session
        except IntegrityError:
            raise ConflictError(conflict) from None
        except (SQLAlchemyError, OSError) as exc:
            raise ServiceUnavailableError("the state store is unavailable") from exc


def wall_time(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime."""
    return datetime.fromtimestamp(clock.wall(), UTC)
