"""The key-provider interfaces: wrapping data keys (DEKs) with key-encryption keys (KEKs), and rotating KEKs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps data keys with a KEK. Wrapped blobs record which KEK (id/version) wrapped them."""

    name: str

    async def wrap(self, dek: bytes, *, tenant_id: str) -> bytes:
        """An opaque blob holding ``dek``, bound to ``tenant_id``."""
        ...

    async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        """The DEK in ``blob``; :class:`DecryptionError` on any failure (wrong tenant, shredded...)."""
        ...

    async def shred(self, tenant_id: str) -> None:
        """Destroy the tenant's KEK material, so no blob wrapped for the tenant opens again."""
        ...


@runtime_checkable
class RotatingKeyProvider(KeyProvider, Protocol):
    """A provider whose KEKs can rotate without downtime (``skyfleet keys rotate-kek``).

    The rotation protocol (driven by :func:`skyfleet.crypto.rotation.rotate_kek`):

    1. :meth:`rotate_kek` makes a new KEK version current; every older version still unwraps.
    2. :meth:`rewrap` is applied to every stored wrapped DEK (the DEK itself never changes, so no
       record is re-encrypted and readers never notice).
    3. Once no stored blob needs an old version (:meth:`kek_version` vs
       :meth:`current_kek_version`), :meth:`retire_old_keks` makes the old versions unusable.
    """

    async def rotate_kek(self, tenant_ids: Sequence[str]) -> int:
        """Start a new KEK version for these tenants (or one for all, if the KEK is shared);
        the number of KEKs that got new key material."""
        ...

    async def rewrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        """``blob`` re-wrapped under the current KEK version (``blob`` itself if already current)."""
        ...

    def kek_version(self, blob: bytes) -> int | None:
        """The KEK version named by ``blob``; None if the format does not tell."""
        ...

    async def current_kek_version(self, tenant_id: str) -> int | None:
        """The KEK version new wraps for the tenant use; None if the provider does not tell."""
        ...

    async def retire_old_keks(self, tenant_ids: Sequence[str]) -> None:
        """Make KEK versions older than the current one unusable (see each provider for what that means)."""
        ...
