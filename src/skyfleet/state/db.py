"""Engines, sessions and migrations for the state store (SQLite or PostgreSQL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from skyfleet.config import ConfigError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: ``pg_advisory_xact_lock`` key serialising migrations ("skyfleet" in ASCII).
MIGRATION_LOCK_ID = 0x736B79666C656574
#: Execution option read by the SQLite ``begin`` hook: "IMMEDIATE" takes the write lock at BEGIN.
SQLITE_BEGIN_OPTION = "skyfleet_sqlite_begin"
#: Execution options for transactions that will write. On SQLite they start with
#: ``BEGIN IMMEDIATE``, so a read-then-write transaction waits for the lock (busy_timeout)
#: instead of failing when another writer got there first; PostgreSQL ignores them.
WRITE_OPTIONS: dict[str, Any] = {SQLITE_BEGIN_OPTION: "IMMEDIATE"}

_SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout=10000",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)
#: Tries of ``PRAGMA journal_mode=WAL`` (see :func:`_set_wal`).
_WAL_ATTEMPTS = 100
_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def _normalise_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("database_url: not a valid SQLAlchemy URL") from None
    parsed = parsed.set(drivername=_DRIVERS.get(parsed.drivername, parsed.drivername))
    if parsed.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ConfigError(
            f"database_url: unsupported driver {parsed.drivername!r}; "
            "use sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db"
        )
    return parsed


def make_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``: SQLite (WAL, synchronous=FULL) or PostgreSQL (pre-pinged pool)."""
    parsed = _normalise_url(url)
    if parsed.get_backend_name() == "postgresql":
        return create_async_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            pool_timeout=10,
            pool_recycle=1800,
            hide_parameters=True,
            connect_args={"timeout": 10, "server_settings": {"application_name": "skyfleet"}},
        )
    database = parsed.database or ""
    if database and database != ":memory:" and not parsed.query.get("uri"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed, hide_parameters=True)
    _install_sqlite_hooks(engine)
    return engine


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    """Pragmas on every connection, and SQLAlchemy (not the driver) in charge of BEGIN."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 driver's own implicit BEGIN; _on_begin below emits it instead, so
        # DDL is transactional and every statement runs inside the transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _SQLITE_PRAGMAS:
                cursor.execute(pragma)
            _set_wal(cursor)
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, retried: on a brand-new file, connections racing to convert
    it get "database is locked" at once (SQLite runs no busy handler for that lock); the retry
    finds the file converted or the lock free."""
    for attempt in range(_WAL_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                raise


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the migrations shipped in this package (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade_head(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision; idempotent and safe to run from many processes.

    Everything happens in one transaction. On PostgreSQL it first takes a transaction-scoped
    advisory lock, so concurrent callers run one after the other and the later ones find the
    schema already current; on SQLite ``BEGIN IMMEDIATE`` serialises them the same way.
    Alembic keeps its migration context in module globals, so within one process do not run
    migrations of two *different* databases concurrently (one database is safe: the lock above).
    """
    async with engine.execution_options(**WRITE_OPTIONS).begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_ID})
        await conn.run_sync(_upgrade_head)
