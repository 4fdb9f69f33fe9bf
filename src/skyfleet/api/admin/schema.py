"""Admin API request bodies and response shapes.

Every body forbids unknown fields (a 400 names the field): a client cannot slip in a field the
route does not expect (mass assignment). What a caller may set is checked by the routes
(:mod:`skyfleet.iam.authz`); the values themselves again by the repositories.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skyfleet.iam.cidr import MAX_CIDRS
from skyfleet.state.key_fields import ALLOW_LIST_MAX, LIMIT_MAX, MODEL_NAME_MAX_LENGTH, RETENTION_DAYS_MAX
from skyfleet.state.repositories import KeyRecord, TenantRecord

_STRICT = ConfigDict(strict=True, extra="forbid")

Role = Literal["platform-admin", "tenant-admin", "member", "read-only"]
ModelName = Annotated[str, Field(min_length=1, max_length=MODEL_NAME_MAX_LENGTH)]
Cidr = Annotated[str, Field(min_length=1, max_length=64)]
Limit = Annotated[int, Field(strict=True, ge=1, le=LIMIT_MAX)]


class CreateTenant(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=63)


class UpdateTenant(BaseModel):
    """PATCH /admin/v1/tenants/{name} (platform-admin): only the fields given change; null clears."""

    model_config = _STRICT
    retention_days: int | None = Field(None, ge=1, le=RETENTION_DAYS_MAX, description="Keep stored state this many days.")
    rpm_limit: Limit | None = Field(None, description="Requests per minute for the whole tenant.")
    tpm_limit: Limit | None = Field(None, description="Tokens per minute for the whole tenant.")
    share_public_prefix: bool = Field(False, description="Share the public (system-prompt) prefix cache.")


class _KeyRestrictions(BaseModel):
    models: list[ModelName] | None = Field(
        None, min_length=1, max_length=ALLOW_LIST_MAX, description="Models the key may use; null: every model.")
    cidrs: list[Cidr] | None = Field(
        None, min_length=1, max_length=MAX_CIDRS,
        description="Client networks the key may be used from, e.g. 10.0.0.0/8; null: anywhere.")
    expires_at: datetime | None = Field(None, description="When the key stops working (timezone-aware).")
    rpm_limit: Limit | None = Field(None, description="This key's requests per minute (on top of its tenant's).")
    tpm_limit: Limit | None = Field(None, description="This key's tokens per minute (on top of its tenant's).")


class CreateKey(_KeyRestrictions):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(min_length=1, max_length=63)
    role: Role = "member"
    name: str | None = Field(None, max_length=128)


class UpdateKey(_KeyRestrictions):
    """PATCH /admin/v1/keys/{key_id}: only the fields given change; null clears a restriction."""

    model_config = ConfigDict(extra="forbid")
    role: Role = "member"
    name: str | None = Field(None, max_length=128)


def changes(body: BaseModel) -> dict[str, Any]:
    """The fields a PATCH body gives (explicit nulls included)."""
    return {name: getattr(body, name) for name in body.model_fields_set}


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def tenant_json(t: TenantRecord) -> dict[str, Any]:
    return {"object": "tenant", "id": t.id, "name": t.name, "created_at": _ts(t.created_at),
            "retention_days": t.retention_days, "rpm_limit": t.rpm_limit, "tpm_limit": t.tpm_limit,
            "share_public_prefix": t.share_public_prefix}


def key_json(k: KeyRecord) -> dict[str, Any]:
    return {
        "object": "api_key", "id": k.id, "tenant": k.tenant_name, "tenant_id": k.tenant_id, "name": k.name,
        "role": k.role, "prefix": k.prefix, "created_at": _ts(k.created_at), "revoked_at": _ts(k.revoked_at),
        "expires_at": _ts(k.expires_at),
        "models": list(k.models) if k.models is not None else None,
        "cidrs": list(k.cidrs) if k.cidrs is not None else None,
        "rpm_limit": k.rpm_limit, "tpm_limit": k.tpm_limit,
    }
