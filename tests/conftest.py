"""Shared fixtures. PostgreSQL and Redis are real servers on 127.0.0.1 (see .ci/run)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from skyfleet.state import Store

POSTGRES_ADMIN_URL = os.environ.get(
    "SKYFLEET_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; an operator's SKYFLEET_* environment must not leak in."""
    for name in list(os.environ):
        if name.startswith("SKYFLEET_") and not name.startswith("SKYFLEET_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the real server, dropped afterwards. Fails if PG is down."""
    import asyncio
    import secrets

    import asyncpg

    name = "skyfleet_e2e_" + secrets.token_hex(4)
    dsn = POSTGRES_ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://")

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except OSError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {dsn} ({exc}); start it (see .ci/run)")
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store on SQLite in the test's temporary directory (migrated, no encryption keys)."""
    from skyfleet.state import Store

    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        yield opened
    finally:
        await opened.close()
