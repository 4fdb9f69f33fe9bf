"""Key providers: where the key-encryption keys (KEKs) live.

=================  ==========================================  ===================================
provider           KEK per tenant                              shred
=================  ==========================================  ===================================
``local``          HKDF(master key file, tenant secret file)   delete the tenant secret file
``aws-kms``        a KMS key, alias ``<prefix>/<tenant id>``   disable + schedule deletion (7 d)
``vault-transit``  a transit key ``<prefix>-<tenant id>``      allow deletion + delete the key
=================  ==========================================  ===================================

All three implement :class:`RotatingKeyProvider` (``skyfleet keys rotate-kek``). The cloud
providers' SDKs are imported only when chosen (extras ``[aws]`` and ``[vault]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from skyfleet.crypto.providers.base import KeyProvider, RotatingKeyProvider
from skyfleet.crypto.providers.local import LocalKeyProvider

if TYPE_CHECKING:
    from skyfleet.config import KeySettings, Settings

__all__ = ["KeyProvider", "LocalKeyProvider", "RotatingKeyProvider", "open_key_provider", "provider_from_keys"]


def provider_from_keys(keys: KeySettings, key_path: Path) -> RotatingKeyProvider:
    """The provider the ``keys`` settings choose (blocking: may read files or load an SDK).

    ``key_path`` is the local provider's key file (``Settings.key_path``).
    """
    if keys.provider == "aws-kms":
        from skyfleet.crypto.providers.aws_kms import AwsKmsProvider

        return AwsKmsProvider.open(keys)
    if keys.provider == "vault-transit":
        from skyfleet.crypto.providers.vault_transit import VaultTransitProvider

        return VaultTransitProvider.open(keys)
    return LocalKeyProvider.open(key_path)


def open_key_provider(settings: Settings) -> RotatingKeyProvider:
    """The key provider of ``settings`` (blocking: call it through ``asyncio.to_thread``)."""
    return provider_from_keys(settings.keys, settings.key_path)
