"""Admin API request bodies and response shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skyfleet.state.repositories import KeyRecord, TenantRecord

_STRICT = ConfigDict(strict=True, extra="forbid")


class CreateTenant(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=63)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(min_length=1, max_length=63)
    role: Literal["platform-admin", "tenant-admin", "member", "read-only"] = "member"
    name: str | None = Field(None, max_length=128)
    expires_at: datetime | None = None


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def tenant_json(t: TenantRecord) -> dict[str, Any]:
    return {"object": "tenant", "id": t.id, "name": t.name, "created_at": _ts(t.created_at),
            "retention_days": t.retention_days}


def key_json(k: KeyRecord) -> dict[str, Any]:
    return {
        "object": "api_key", "id": k.id, "tenant": k.tenant_name, "tenant_id": k.tenant_id, "name": k.name,
        "role": k.role, "prefix": k.prefix, "created_at": _ts(k.created_at), "revoked_at": _ts(k.revoked_at),
        "expires_at": _ts(k.expires_at),
    }
