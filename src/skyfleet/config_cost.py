"""Settings sections for admission and cost: rate limits, budgets, prices, charging weights, metering.

Part of the one settings object (:class:`skyfleet.config.Settings` holds them as ``limits``,
``budgets`` and ``cost``); kept here so that module stays readable. Every field is documented.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "[::1]", "localhost")


def https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK_HOSTS)


class LimitSettings(BaseModel):
    """Rate limits (requests and tokens per minute); see gateway/ratelimit.py for the algorithm.

    A tenant's own limits (tenants.rpm_limit / tpm_limit) and a key's (api_keys.*) come from the
    store; these are the defaults and how limits are shared between gateways (``redis_url``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_tenant_rpm: int | None = Field(
        None, ge=1, le=10**9,
        description="Requests per minute of a tenant without its own limit; unset: unlimited.")
    default_tenant_tpm: int | None = Field(
        None, ge=1, le=10**12,
        description="Tokens per minute of a tenant without its own limit; unset: unlimited.")
    estimate_completion_tokens: int = Field(
        256, ge=1, le=1_048_576, description="Completion tokens charged at admission when a request sets no "
        "max_tokens; the actual usage is reconciled when the request ends.")
    redis_prefix: str = Field(
        "skyfleet:rl", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Prefix of the limiter's Redis keys.")
    on_redis_error: Literal["allow", "deny"] = Field(
        "allow", description="With redis_url set but Redis unreachable: allow (admit unchecked; a warning is "
        "logged and skyfleet_ratelimit_unavailable_total counts them) or deny (503, Retry-After: 1).")
    redis_timeout_s: float = Field(
        0.25, gt=0, le=10, description="Longest a request waits for the limiter's Redis (pool, connect, reply).")
    redis_max_connections: int = Field(64, ge=1, le=10_000, description="Pooled Redis connections per gateway.")


class BudgetSettings(BaseModel):
    """Budgets (cost/budgets.py): where the shared counters live, reservations, soft-limit alerts.

    The budgets themselves (per tenant and per key, daily/monthly/total, soft and hard limits) are
    in the store, managed with ``/admin/v1/budgets`` or ``skyfleet budgets``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["auto", "database", "redis"] = Field(
        "auto", description="Where spend and reservations are counted: database (the store: PostgreSQL, shared "
        "by gateways on one database, or SQLite for one gateway), redis (redis_url: one Lua script per "
        "request), auto (redis when redis_url is set, else database).")
    reservation_ttl_s: float = Field(
        900.0, ge=1, le=7 * 86_400, description="A reservation not settled within this long is released: the "
        "bound on how long a crashed gateway's in-flight requests hold budget. Keep it above request_timeout_s "
        "(a request outliving its reservation is still charged, but no longer reserved).")
    sweep_interval_s: float = Field(
        30.0, gt=0, le=3600, description="database backend: how often expired reservations are released.")
    cache_ttl_s: float = Field(
        1.0, ge=0, le=300, description="How long a gateway caches which budgets a tenant has. Changes made "
        "through a gateway apply there at once, elsewhere within this long (limit changes apply at once on "
        "the database backend, which reads them in the reserving statement).")
    unknown_context_window: int = Field(
        32_768, ge=1, le=10_485_760, description="Context window assumed, for the reservation of a request "
        "without max_tokens, when the model's replicas report none.")
    on_error: Literal["deny", "allow"] = Field(
        "deny", description="When the counters cannot be reached: deny (503, Retry-After: 1; no request "
        "runs unbudgeted) or allow (admit without a reservation; logged and counted).")
    redis_prefix: str = Field(
        "skyfleet:budget", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Prefix of the budget Redis keys.")
    redis_timeout_s: float = Field(
        0.5, gt=0, le=10, description="Longest a request waits for the budget Redis (pool, connect, reply).")
    webhook_url: SecretStr | None = Field(
        None, description="Soft-limit alerts are also POSTed here as JSON (budget id, tenant id, key id, "
        "period, limit and spend; never a key or text). HTTPS, or HTTP on a loopback host. Secret: such "
        "URLs often carry a token.")
    webhook_timeout_s: float = Field(2.0, gt=0, le=30, description="Timeout of one webhook POST.")
    webhook_retries: int = Field(
        2, ge=0, le=10, description="Retries of a failed webhook POST (backoff 0.5 s, doubling); then dropped "
        "and logged. Alerts never block or fail a request.")

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not https_or_loopback(v.get_secret_value()):
            raise ValueError("must be an https:// URL (http:// only on a loopback host)")
        return v


class TokenWeightSettings(BaseModel):
    """Weights of the three kinds of token, relative to a completion (decode) token (cost/pricing.py).

    Charging and attribution count ``prefill * uncached prompt + cached * cached prompt + decode *
    completion`` weighted tokens. Defaults: a prompt token costs a quarter of a generated one
    (prefill is batched: one forward pass for the whole prompt; decode runs a pass per token), and a
    cached prompt token a tenth of an uncached one (it skips prefill but still holds KV memory and
    is attended to), close to the ratios API providers charge (output 4-5x input, cached input 0.1x).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill: float = Field(0.25, ge=0, le=1000, allow_inf_nan=False, description="Weight of an uncached prompt token.")
    cached: float = Field(
        0.025, ge=0, le=1000, allow_inf_nan=False, description="Weight of a cached prompt token (at most prefill).")
    decode: float = Field(1.0, ge=0, le=1000, allow_inf_nan=False, description="Weight of a completion token.")

    @model_validator(mode="after")
    def _order(self) -> TokenWeightSettings:
        if self.cached > self.prefill:
            raise ValueError("cost.weights.cached must not exceed cost.weights.prefill")
        if self.prefill == self.cached == self.decode == 0:
            raise ValueError("cost.weights: at least one weight must be > 0")
        return self


class PriceOverrideSettings(BaseModel):
    """A price of the instance catalog replaced (negotiated discount, a fresher list price)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_type: str = Field(min_length=1, max_length=64, description="Catalog instance type, e.g. g5.xlarge.")
    region: str = Field(min_length=1, max_length=64, description="Catalog region, e.g. us-east-1.")
    ondemand_usd_per_hr: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="On-demand USD/hour; unset: the catalog's.")
    spot_usd_per_hr: float | None = Field(None, ge=0, allow_inf_nan=False, description="Spot USD/hour; unset: the catalog's.")


class ApiPriceSettings(BaseModel):
    """Per-token prices of an API-priced upstream (static replica with tier api), USD per million tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_usd_per_mtok: float = Field(ge=0, allow_inf_nan=False, description="Uncached prompt (input) tokens.")
    cached_usd_per_mtok: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Cached prompt tokens; default: the prompt price.")
    completion_usd_per_mtok: float = Field(ge=0, allow_inf_nan=False, description="Completion (output) tokens.")


class CostSettings(BaseModel):
    """Replica prices, charging weights and metering (cost/pricing.py, cost/metering.py; docs/cost.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    local_usd_per_hour: float = Field(
        0.085, ge=0, le=10_000, allow_inf_nan=False,
        description="Price of one local replica in USD per hour. Default: an AWS c6i.large on-demand in "
        "us-east-1 (2 vCPUs, 4 GiB, Linux: $0.085/h), the size of VM one 2-thread CPU replica needs.")
    price_overrides: tuple[PriceOverrideSettings, ...] = Field(
        (), description="Catalog prices replaced per instance type and region.")
    weights: TokenWeightSettings = Field(default_factory=TokenWeightSettings)
    nominal_tokens_per_s: dict[str, float] = Field(
        default_factory=dict, description="Weighted tokens per second one replica of a pool serves at a normal "
        "load, by pool name: a token's charged price is the replica's $/s divided by it.")
    default_nominal_tokens_per_s: float = Field(
        100.0, gt=0, le=10**7, allow_inf_nan=False, description="Nominal weighted tokens/s of a pool not in "
        "nominal_tokens_per_s (about what one 2-thread llama.cpp replica of SmolLM2-135M serves).")
    api_prices: dict[str, ApiPriceSettings] = Field(
        default_factory=dict, description="Per-token prices of API-priced upstreams (tier api), by model name.")
    usage_batch_size: int = Field(
        500, ge=1, le=100_000, description="Usage records written in one statement; a full batch is written "
        "at once, a partial one every usage_flush_interval_s.")
    usage_flush_interval_s: float = Field(
        1.0, gt=0, le=60, description="Longest a usage record waits in memory before it is written (what a "
        "crash can lose).")
    usage_max_pending: int = Field(
        100_000, ge=1, le=10_000_000, description="Usage records kept in memory while the store is unreachable; "
        "beyond it new ones are dropped and counted (skyfleet_usage_dropped_total).")
    interval_heartbeat_s: float = Field(
        15.0, gt=0, le=3600, description="How often an open replica cost interval's heartbeat is refreshed "
        "(after a crash the interval is taken to end at its last heartbeat).")
    sample_interval_s: float = Field(
        10.0, gt=0, le=3600, description="How often a utilisation sample of each replica (from the health "
        "checker's /metrics scrapes) is stored, for right-sizing advice.")

    @field_validator("nominal_tokens_per_s")
    @classmethod
    def _tps(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        for pool, tps in v.items():
            if not isinstance(tps, int | float) or not math.isfinite(tps) or tps <= 0:
                raise ValueError(f"{pool}: must be a finite number > 0")
        return v
