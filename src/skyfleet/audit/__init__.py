"""The audit log: what was done, by whom, to which tenant; append-only and hash-chained.

Handlers call :meth:`Audit.record`; it never blocks and never raises (entries are queued and
written in batches by a background task). An entry names the acting key by its id, never the key,
token, prompt or completion.

* :mod:`skyfleet.audit.chain`: the canonical entry encoding, the hash chain, verification (pure).
* :mod:`skyfleet.audit.log`: :class:`~skyfleet.audit.log.AuditLog`, the queue and its writer.
* :mod:`skyfleet.state.audit`: the table (append with retry on a lost race, pages, listing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from skyfleet.iam.principal import Principal

#: Detail values are small scalars only (never free text from a request body).
DetailValue = str | int | float | bool | None


class Audit(Protocol):
    def record(
        self,
        action: str,
        *,
        actor: Principal | None,
        tenant_id: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        **detail: DetailValue,
    ) -> None:
        """Queue one entry. ``action`` is dotted, e.g. ``tenant.create``, ``key.revoke``, ``auth.failure``.

        ``tenant_id`` is the tenant acted upon; when None, the actor's own tenant (none for a
        platform admin). ``target`` names the object (an id); ``detail`` holds scalars only.
        """
        ...

    def key_used(self, principal: Principal) -> None:
        """Count one authenticated use of a key (cheap: at most one ``key.use`` entry per key per minute)."""
        ...


class DiscardAudit:
    """An :class:`Audit` that keeps nothing (tests of parts that do not care about auditing)."""

    def record(
        self,
        action: str,
        *,
        actor: Principal | None,
        tenant_id: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        **detail: DetailValue,
    ) -> None:
        return None

    def key_used(self, principal: Principal) -> None:
        return None
