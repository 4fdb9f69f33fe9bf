"""Engines, migrations and failure mapping, on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from skyfleet.config import ConfigError
from skyfleet.errors import ServiceUnavailableError
from skyfleet.state import Store, make_engine, migrate
from skyfleet.state.db import alembic_config
from skyfleet.state.models import Base

from .conftest import sqlite_url

UNREACHABLE_PG = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def schema_state(engine: AsyncEngine) -> tuple[list[str], set[str]]:
    async with engine.connect() as conn:
        versions = list((await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars())
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    return versions, tables


async def test_sqlite_pragmas_on_every_connection(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "state.db"
    engine = make_engine(sqlite_url(path))
    try:
        async with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
                assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2  # FULL
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
                assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 10000
        assert path.is_file()
    finally:
        await engine.dispose()


async def test_sqlite_foreign_keys_enforced(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "state.db"))
    try:
        await migrate(engine)
        with pytest.raises(Exception, match="FOREIGN KEY"):
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO api_keys (id, tenant_id, role, prefix, key_hash, created_at) "
                        "VALUES ('key_x', 'ten_missing', 'member', 'sk-sf-x', 'h', '2025-01-01 00:00:00')"
                    )
                )
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("sqlite:///{tmp}/a.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:///{tmp}/b.db", "sqlite+aiosqlite"),
        ("postgresql://u@localhost/db", "postgresql+asyncpg"),
        ("postgres://u@localhost/db", "postgresql+asyncpg"),
        ("postgresql+asyncpg://u@localhost/db", "postgresql+asyncpg"),
    ],
)
async def test_make_engine_picks_the_async_driver(url: str, driver: str, tmp_path: Path) -> None:
    engine = make_engine(url.format(tmp=tmp_path))
    try:
        assert engine.url.drivername == driver
    finally:
        await engine.dispose()


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db", "not a url"])
def test_make_engine_rejects_unsupported_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="database_url"):
        make_engine(url)


async def test_migrate_creates_schema_and_is_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        await migrate(engine)
        versions, tables = await schema_state(engine)
        assert versions == [head_revision()]
        assert {"tenants", "api_keys", "alembic_version"} <= tables
        await migrate(engine)
        await migrate(engine)
        assert await schema_state(engine) == (versions, tables)
    finally:
        await engine.dispose()


async def test_concurrent_migrate_from_several_engines(db_url: str) -> None:
    # Several gateway processes starting at once on one fresh database.
    engines = [make_engine(db_url) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(e) for e in engines))
        versions, tables = await schema_state(engines[0])
        assert versions == [head_revision()]
        assert {"tenants", "api_keys"} <= tables
    finally:
        for engine in engines:
            await engine.dispose()


async def test_models_match_migrations(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        await migrate(engine)

        def diff(conn: Connection) -> list[object]:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_back(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
        versions, tables = await schema_state(engine)
        assert versions == [] and not {"tenants", "api_keys"} & tables
        await migrate(engine)
        assert (await schema_state(engine))[0] == [head_revision()]
    finally:
        await engine.dispose()


async def test_store_open_twice_on_one_database(db_url: str) -> None:
    first = await Store.open(db_url)
    second = await Store.open(db_url)
    try:
        await first.tenants.create("shared")
        assert [t.name for t in await second.tenants.list()] == ["shared"]
    finally:
        await first.close()
        await second.close()


async def test_ping(store: Store) -> None:
    assert await store.ping()


async def test_unreachable_database_maps_to_our_errors() -> None:
    store = Store(make_engine(UNREACHABLE_PG))
    try:
        assert await store.ping() is False
        with pytest.raises(ServiceUnavailableError):
            await store.tenants.list()
        with pytest.raises(ServiceUnavailableError):
            await store.keys.lookup("0" * 64)
    finally:
        await store.close()
    with pytest.raises(ServiceUnavailableError, match="cannot open the state store"):
        await Store.open(UNREACHABLE_PG)


async def test_concurrent_migrate_from_several_processes(db_url: str) -> None:
    # Separate interpreters, as when several gateways start at once: without the advisory lock
    # (PostgreSQL) or BEGIN IMMEDIATE (SQLite) some of them fail creating the same tables.
    script = (
        "import asyncio, sys\n"
        "from skyfleet.state import make_engine, migrate\n"
        "async def main():\n"
        "    engine = make_engine(sys.argv[1])\n"
        "    try:\n"
        "        await migrate(engine)\n"
        "    finally:\n"
        "        await engine.dispose()\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", script, db_url, stdout=PIPE, stderr=PIPE)
        for _ in range(3)
    ]
    results = [await p.communicate() for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    engine = make_engine(db_url)
    try:
        assert (await schema_state(engine))[0] == [head_revision()]
    finally:
        await engine.dispose()
