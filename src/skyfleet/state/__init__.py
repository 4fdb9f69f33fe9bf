"""The state store: tenants and API keys in SQLite or PostgreSQL, with Alembic migrations."""

from skyfleet.state.db import make_engine, make_session_factory, migrate
from skyfleet.state.repositories import (
    ROLES,
    ApiKeyRepository,
    Credential,
    KeyRecord,
    Store,
    TenantRecord,
    TenantRepository,
)

__all__ = [
    "ROLES",
    "ApiKeyRepository",
    "Credential",
    "KeyRecord",
    "Store",
    "TenantRecord",
    "TenantRepository",
    "make_engine",
    "make_session_factory",
    "migrate",
]
