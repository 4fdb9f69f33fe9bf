"""Envelope encryption of tenant-private data at rest.

Layers::

    record    --AES-256-GCM, AAD = record_aad(tenant, kind, id)-->  ciphertext (DataCipher)
    DEK       one per tenant and version, random 32 bytes; stored *wrapped* in ``tenant_keys``
    KEK       held by a KeyProvider, never in the database (providers/: LocalKeyProvider, files
              on disk; AwsKmsProvider, a KMS key per tenant; VaultTransitProvider, a transit key
              per tenant)

Every failure (wrong key, tampered bytes, wrong AAD or tenant, shredded key) is one opaque
:class:`DecryptionError`. Ciphertexts name the DEK version that sealed them, and wrapped DEKs
name the KEK version that wrapped them, so keys can rotate without re-encrypting old records.
Rotation with no downtime: ``rotation.rotate_kek`` (new KEK version, rewrap every stored DEK, then
retire the old KEK versions) and ``skyfleet.state.reencrypt.rotate_dek`` (new DEK version for a
tenant, re-encrypt its records in the background, then destroy the old DEK versions).

Crypto-shredding versus backups. A database backup holds the wrapped DEKs, so deleting the DEK
rows alone would be undone by restoring the backup. The KEK is therefore per tenant and lives
outside the database: LocalKeyProvider derives it from the master key file *and* a per-tenant
wrapping secret kept beside it (``<key file>.tenants/``), and :meth:`TenantKeyring.shred`
first has the provider delete that secret, then deletes the DEK rows. A restored dump brings the
wrapped DEKs back, but nothing can unwrap them any more. Consequently the key directory must be
backed up separately from the database, with a retention no longer than the promised shredding
delay (or not at all, accepting that losing it loses the data).
"""

from skyfleet.crypto.cipher import DataCipher, record_aad
from skyfleet.crypto.errors import DecryptionError
from skyfleet.crypto.keyring import TenantKeyring
from skyfleet.crypto.providers import (
    KeyProvider,
    LocalKeyProvider,
    RotatingKeyProvider,
    open_key_provider,
    provider_from_keys,
)

__all__ = [
    "DataCipher",
    "DecryptionError",
    "KeyProvider",
    "LocalKeyProvider",
    "RotatingKeyProvider",
    "TenantKeyring",
    "open_key_provider",
    "provider_from_keys",
    "record_aad",
]
