"""Fixtures for the state store tests: every store test runs on real SQLite and real PostgreSQL.

PostgreSQL: ``SKYFLEET_TEST_POSTGRES_URL`` (default: trust auth as ``postgres`` on 127.0.0.1:5432)
names an admin database; each test gets a fresh throwaway database, dropped afterwards. When the
server is unreachable the PostgreSQL tests fail (they are never skipped).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from skyfleet.clock import ManualClock
from skyfleet.crypto import LocalKeyProvider
from skyfleet.state import Store

PG_ADMIN_URL = os.environ.get(
    "SKYFLEET_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
async def pg_admin() -> AsyncIterator[AsyncEngine]:
    """An AUTOCOMMIT engine on the admin database, for CREATE/DROP DATABASE."""
    engine = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        await engine.dispose()
        shown = make_url(PG_ADMIN_URL).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL is not reachable at {shown} ({type(exc).__name__}: {exc}). The state store "
            "tests need a real server: start it (pg_ctlcluster --skip-systemctl-redirect <version> main "
            "start) or point SKYFLEET_TEST_POSTGRES_URL at one.",
            pytrace=False,
        )
    yield engine
    await engine.dispose()


@asynccontextmanager
async def throwaway_database(admin: AsyncEngine) -> AsyncIterator[str]:
    """A new empty PostgreSQL database; yields its URL and drops it afterwards."""
    name = f"skyfleet_t_{secrets.token_hex(6)}"
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def pg_url(pg_admin: AsyncEngine) -> AsyncIterator[str]:
    async with throwaway_database(pg_admin) as url:
        yield url


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend (PostgreSQL is only required by the PostgreSQL half)."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "state.db")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated store on each backend."""
    opened = await Store.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


# -- the encrypted conversation/response store --


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    """Where the local key provider keeps its key file (and ``<name>.tenants/`` beside it)."""
    return tmp_path / "keys" / "kek.key"


@pytest.fixture
def key_provider(key_path: Path) -> LocalKeyProvider:
    return LocalKeyProvider.open(key_path)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def secure_store(
    db_url: str, key_provider: LocalKeyProvider, clock: ManualClock
) -> AsyncIterator[Store]:
    """A migrated store with conversations, responses and a keyring, on each backend."""
    opened = await Store.open(db_url, key_provider=key_provider, clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def tenant_ids(secure_store: Store) -> tuple[str, str]:
    """Two tenants: (acme, globex)."""
    first = await secure_store.tenants.create("acme")
    second = await secure_store.tenants.create("globex")
    return first.id, second.id
