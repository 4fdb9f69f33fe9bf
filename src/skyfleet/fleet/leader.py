"""Which gateway runs the fleet controller: the one holding a PostgreSQL advisory lock.

Several gateways share one database; each could run a controller, and two controllers would fight over the
same pools. :class:`AdvisoryLeadership` holds ``pg_try_advisory_lock(key)`` on a connection of its own: the
lock is the session's, so it is released when that connection ends, however the gateway ends (a crash, a
network partition that drops the connection). The others try again each round and take over. With SQLite
(one gateway on one machine) :class:`AlwaysLeader` is used.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("skyfleet.fleet.leader")

__all__ = ["AdvisoryLeadership", "AlwaysLeader", "Leadership", "leadership_for", "lock_key"]


class Leadership(Protocol):
    async def held(self) -> bool:
        """Whether this gateway runs the controller now (tries to become the leader if it is not)."""
        ...

    async def release(self) -> None: ...


class AlwaysLeader:
    async def held(self) -> bool:
        return True

    async def release(self) -> None:
        return None


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(f"skyfleet/fleet-controller/{name}".encode()).digest()[:8], "big",
                          signed=True)


class AdvisoryLeadership:
    def __init__(self, engine: AsyncEngine, name: str = "default") -> None:
        self._engine = engine
        self._key = lock_key(name)
        self._conn: AsyncConnection | None = None

    async def held(self) -> bool:
        try:
            if self._conn is not None:  # still ours while its session lives
                await self._conn.execute(text("SELECT 1"))
                return True
            conn = await self._engine.connect()
            got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key})).scalar()
            await conn.commit()
            if got:
                self._conn = conn
                log.info("fleet controller leadership taken")
                return True
            await conn.close()
            return False
        except (SQLAlchemyError, OSError) as exc:
            log.warning("fleet controller leadership lost or unavailable", extra={"detail": type(exc).__name__})
            await self._drop()
            return False

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.invalidate()
            except (SQLAlchemyError, OSError):
                pass

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            await conn.commit()
            await conn.close()
        except (SQLAlchemyError, OSError):
            await conn.invalidate()


def leadership_for(engine: AsyncEngine, enabled: bool, **kw: Any) -> Leadership:
    """Advisory-lock leadership on PostgreSQL when ``enabled``; otherwise always the leader."""
    if enabled and engine.dialect.name == "postgresql":
        return AdvisoryLeadership(engine, **kw)
    return AlwaysLeader()
