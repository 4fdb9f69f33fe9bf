"""Who is calling: derived only from the authenticated credential, never from a header or body."""

from __future__ import annotations

from dataclasses import dataclass

PLATFORM_ADMIN = "platform-admin"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    tenant_name: str
    role: str
    #: The API key's id, or ``oidc:<hash of issuer and subject>`` for a JWT; never a secret.
    key_id: str
    #: Models this credential may use; None: every model.
    models: frozenset[str] | None = None
    #: Per-credential requests and tokens per minute; None: only the tenant's limits apply.
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    #: The tenant's requests and tokens per minute; None: the configured default.
    tenant_rpm_limit: int | None = None
    tenant_tpm_limit: int | None = None
    #: The tenant opted in to sharing the public (system-prompt) prefix cache.
    share_public_prefix: bool = False

    @property
    def is_platform_admin(self) -> bool:
        return self.role == PLATFORM_ADMIN

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models
