"""Who is calling: derived only from the authenticated credential, never from a header or body."""

from __future__ import annotations

from dataclasses import dataclass

PLATFORM_ADMIN = "platform-admin"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    tenant_name: str
    role: str
    key_id: str

    @property
    def is_platform_admin(self) -> bool:
        return self.role == PLATFORM_ADMIN
