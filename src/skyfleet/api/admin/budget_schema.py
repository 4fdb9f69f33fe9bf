"""Request bodies and the response shape of ``/admin/v1/budgets``.

Amounts are dollars, as decimal strings ("12.50") or JSON numbers (12.5): non-negative, finite, at
most 6 decimals, at most $1e9 (:func:`skyfleet.cost.budgets.parse_usd`); after validation the
fields hold integer micro-dollars. Responses give both: ``*_usd`` (decimal string) and
``*_usd_micros`` (integer). Unknown fields are refused (mass assignment).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from skyfleet.cost.budget_gate import BudgetStatus
from skyfleet.cost.budgets import MAX_USD_MICROS, MICROS_PER_USD, format_usd, parse_usd

_USD_SCHEMA = {
    "anyOf": [{"type": "string", "pattern": r"^\s*\d{1,10}(\.\d{1,6})?\s*$"},
              {"type": "number", "minimum": 0, "maximum": MAX_USD_MICROS // MICROS_PER_USD}],
    "description": "US dollars: a decimal string or a number, >= 0, at most 6 decimals.",
}


def _usd(value: Any) -> int:
    return parse_usd(value)


Usd = Annotated[int, BeforeValidator(_usd), WithJsonSchema(_USD_SCHEMA)]


class CreateBudget(BaseModel):
    """POST /admin/v1/budgets: a budget for a tenant (``tenant``) or for one API key (``key_id``)."""

    model_config = ConfigDict(extra="forbid")
    tenant: str | None = Field(None, min_length=1, max_length=63,
                               description="The tenant's name (a tenant budget; with key_id it must be the key's).")
    key_id: str | None = Field(None, min_length=1, max_length=32, description="An API key's id (a key budget).")
    period: Literal["daily", "monthly", "total"] = Field(
        description="daily / monthly: UTC calendar windows; total: never resets.")
    soft_limit_usd: Usd | None = Field(None, description="Alert (log and webhook) once per period at this spend.")
    hard_limit_usd: Usd | None = Field(None, description="Refuse requests (429 budget_exceeded) past this spend.")


class UpdateBudget(BaseModel):
    """PATCH /admin/v1/budgets/{budget_id}: only the limits given change; null clears one."""

    model_config = ConfigDict(extra="forbid")
    soft_limit_usd: Usd | None = Field(None, description="Alert once per period at this spend; null: none.")
    hard_limit_usd: Usd | None = Field(None, description="Refuse requests past this spend; null: none.")


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _money(micros: int | None) -> str | None:
    return format_usd(micros) if micros is not None else None


def budget_json(s: BudgetStatus, tenant_name: str | None) -> dict[str, Any]:
    b = s.budget
    return {
        "object": "budget", "id": b.id, "tenant": tenant_name, "tenant_id": b.tenant_id, "key_id": b.key_id,
        "scope": b.scope, "period": b.period,
        "soft_limit_usd": _money(b.soft_limit_usd_micros), "soft_limit_usd_micros": b.soft_limit_usd_micros,
        "hard_limit_usd": _money(b.hard_limit_usd_micros), "hard_limit_usd_micros": b.hard_limit_usd_micros,
        "created_at": _ts(b.created_at), "updated_at": _ts(b.updated_at),
        "current": {
            "period_start": _ts(s.period_start) if b.period != "total" else None,
            "resets_at": _ts(s.period_end),
            "spent_usd": format_usd(s.state.spent), "spent_usd_micros": s.state.spent,
            "reserved_usd": format_usd(s.state.reserved), "reserved_usd_micros": s.state.reserved,
        },
    }
