"""Saved llama.cpp slots, sealed at rest with their tenant's data key.

llama.cpp writes a saved slot (the KV cache of a session's prompt and answer, token ids included)
to its ``--slot-save-path`` in the clear. :class:`SlotSealer` keeps such files sealed there:

* **save**: llama.cpp writes to a one-off *scratch* name; the gateway reads it, seals it with the
  tenant's current DEK (AES-256-GCM, :class:`~skyfleet.crypto.cipher.DataCipher`) and replaces it
  with ``<tenant>-<hash>.kvs`` (written to a temporary name, then renamed). The scratch file is
  removed whatever happens.
* **restore**: the sealed file is opened with the DEK version its header names into a new scratch
  file, llama.cpp restores from it, and the scratch file is removed.
* The associated data binds the file to its tenant and name (``record_aad(tenant, "kv-slot",
  name)``): a file renamed to another session or tenant does not open.
* A file that does not open (tampered, or its key retired or shredded) is deleted and counts as no
  saved state: the session's next turn is prefilled again from its stored conversation. Crypto-
  shredding a tenant therefore makes its slot files useless, and the tenant's deletion deletes them
  too (:meth:`skyfleet.engines.kvstate.LlamaSlots.forget_tenant`).

Plaintext exists on disk only between llama.cpp writing a scratch file and the gateway sealing it,
and during a restore (milliseconds; both are on the same host). File I/O and AES run in a worker
thread, never on the event loop. The gateway must see the replicas' slot directory: true for the
local provider (``<data_dir>/slots``); see docs/security.md for Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path
from typing import Protocol

from skyfleet.crypto.cipher import DataCipher, record_aad
from skyfleet.crypto.errors import DecryptionError
from skyfleet.errors import SkyfleetError

log = logging.getLogger("skyfleet.kvseal")

SEALED_SUFFIX = ".kvs"
_KIND = "kv-slot"


class DataKeys(Protocol):
    """What the sealer needs of :class:`~skyfleet.crypto.keyring.TenantKeyring`."""

    async def data_key(self, tenant_id: str, *, fresh: bool = False) -> tuple[int, bytes]: ...
    async def data_key_version(self, tenant_id: str, version: int) -> bytes: ...


def scratch_name(sealed: str) -> str:
    """A one-off plaintext file name for ``sealed`` (several saves or restores of one session may overlap)."""
    return f"{sealed.removesuffix(SEALED_SUFFIX)}.{secrets.token_hex(6)}.bin"


class SlotSealer:
    def __init__(self, slot_dir: Path, keys: DataKeys) -> None:
        self._dir = slot_dir
        self._keys = keys
        self.stats = {"sealed": 0, "opened": 0, "unreadable": 0}

    async def seal(self, tenant_id: str, scratch: str, sealed: str) -> bool:
        """Seal the plaintext ``scratch`` file llama.cpp just wrote as ``sealed``; False if it was not there."""
        try:
            version, dek = await self._keys.data_key(tenant_id)
            return await asyncio.to_thread(self._seal_file, dek, version, tenant_id, scratch, sealed)
        except (SkyfleetError, OSError) as exc:  # no key (the store is down, the tenant was just deleted), no disk
            log.warning("a saved slot could not be sealed: dropped", extra={"error": type(exc).__name__})
            return False
        finally:
            await self.discard(scratch)

    def _seal_file(self, dek: bytes, version: int, tenant_id: str, scratch: str, sealed: str) -> bool:
        try:
            plain = (self._dir / scratch).read_bytes()
        except FileNotFoundError:
            log.warning("a saved slot file is not in this gateway's slot directory: it cannot be sealed or restored",
                        extra={"slot_dir": str(self._dir)})
            return False
        blob = DataCipher.encrypt(dek, plain, record_aad(tenant_id, _KIND, sealed), key_version=version)
        tmp = self._dir / f".{sealed}.{secrets.token_hex(6)}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, self._dir / sealed)
        self.stats["sealed"] += 1
        return True

    async def open(self, tenant_id: str, sealed: str) -> str | None:
        """Decrypt ``sealed`` into a new scratch file and return its name (the caller :meth:`discard` s it);
        None if there is no such file or it does not open (then it is deleted)."""
        try:
            blob = await asyncio.to_thread((self._dir / sealed).read_bytes)
        except FileNotFoundError:
            return None
        try:
            dek = await self._keys.data_key_version(tenant_id, DataCipher.key_version(blob))
            scratch = scratch_name(sealed)
            await asyncio.to_thread(self._open_file, dek, blob, tenant_id, sealed, scratch)
        except DecryptionError:
            self.stats["unreadable"] += 1
            log.info("a saved slot file did not open (tampered, or its key is retired or shredded): deleted")
            await self.discard(sealed)
            return None
        except (SkyfleetError, OSError) as exc:  # the key store is unreachable, the disk failed: kept for later
            log.warning("a saved slot could not be opened now", extra={"error": type(exc).__name__})
            return None
        self.stats["opened"] += 1
        return scratch

    def _open_file(self, dek: bytes, blob: bytes, tenant_id: str, sealed: str, scratch: str) -> None:
        plain = DataCipher.decrypt(dek, blob, record_aad(tenant_id, _KIND, sealed))
        (self._dir / scratch).write_bytes(plain)

    async def discard(self, name: str) -> None:
        await asyncio.to_thread((self._dir / name).unlink, missing_ok=True)
