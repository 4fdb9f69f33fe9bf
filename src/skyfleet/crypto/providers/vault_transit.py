"""HashiCorp Vault's Transit secrets engine as the key provider: one transit key per tenant.

* **Key per tenant**: ``<key prefix>-<tenant id>``, type ``aes256-gcm96``, created on the tenant's
  first wrap (``POST <mount>/keys/<name>``, which leaves an existing key as it is). With
  ``derived`` (the default) Vault derives the encryption key from the request's ``context`` =
  base64(tenant id), binding every blob to its tenant like KMS's encryption context; the choice is
  fixed when a key is created (a derived key refuses requests without the context).
* **Wrap / unwrap** are ``encrypt`` / ``decrypt`` of base64(DEK); the stored blob is Vault's
  ciphertext string ``vault:v<N>:<base64>`` as ASCII bytes.
* **Shred** = ``POST keys/<name>/config deletion_allowed=true`` then ``DELETE keys/<name>``: every
  version of the key is gone from Vault at once (Vault's own storage backups aside).
* **KEK rotation** = ``POST keys/<name>/rotate`` (new key version) and ``rewrap`` of every stored
  wrapped DEK (inside Vault: the DEK never leaves it); retiring the old versions sets the key's
  ``min_decryption_version`` to the latest, so older ciphertexts no longer decrypt. Their key
  material stays in Vault until trimmed (``vault write <mount>/keys/<name>/trim``).

Errors are mapped at this boundary: 400/401/403/404/405 (bad ciphertext, wrong context, no such
key, permission denied) are one opaque :class:`DecryptionError` (fail closed); 429, 5xx and
network errors are :class:`ServiceUnavailableError`. A 403 first re-reads the token file, if one
is configured (Vault Agent renews it there), and retries once.

hvac is synchronous: every call runs in a worker thread; each thread has its own hvac client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from skyfleet.config import ConfigError
from skyfleet.crypto.cipher import KEY_BYTES
from skyfleet.crypto.errors import DecryptionError
from skyfleet.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from skyfleet.config import KeySettings

log = logging.getLogger("skyfleet.crypto")

_T = TypeVar("_T")
_CIPHERTEXT_RE = re.compile(rb"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/=]+", re.ASCII)
KEY_TYPE = "aes256-gcm96"


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace removed); :class:`ConfigError` if unusable."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keys.vault_token_file {path}: cannot read it ({type(exc).__name__})") from None
    if not token:
        raise ConfigError(f"keys.vault_token_file {path} is empty")
    return token


class VaultTransitProvider:
    """Per-tenant Vault Transit keys (see the module doc)."""

    name = "vault-transit"

    def __init__(
        self,
        client_factory: Callable[[str], Any],
        *,
        token: Callable[[], str],
        mount: str = "transit",
        key_prefix: str = "skyfleet",
        derived: bool = True,
    ) -> None:
        """``client_factory(token)`` makes an ``hvac.Client``; ``token()`` gives the current token."""
        self._factory = client_factory
        self._read_token = token
        self._token = token()
        self._generation = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.mount = mount.strip("/")
        self.key_prefix = key_prefix
        self.derived = derived

    @classmethod
    def open(cls, keys: KeySettings) -> VaultTransitProvider:
        """A provider configured from the ``keys`` settings (blocking: may read the token file)."""
        try:
            import hvac
        except ImportError:  # pragma: no cover - hvac is installed with the [vault] extra
            raise ConfigError(
                "keys.provider 'vault-transit' needs hvac: install skyfleet with the [vault] extra"
            ) from None
        if keys.vault_url is None:
            raise ConfigError("keys.vault_url is required when keys.provider is 'vault-transit'")
        url = keys.vault_url
        verify: bool | str = str(keys.vault_ca_file) if keys.vault_ca_file is not None else True
        timeout = keys.request_timeout_s
        namespace = keys.vault_namespace
        if keys.vault_token_file is not None:
            token_file = keys.vault_token_file

            def token() -> str:
                return read_token_file(token_file)

        elif keys.vault_token is not None:
            secret = keys.vault_token

            def token() -> str:
                return secret.get_secret_value()

        else:
            raise ConfigError("keys.vault_token or keys.vault_token_file is required for 'vault-transit'")

        def factory(current: str) -> Any:
            return hvac.Client(url=url, token=current, namespace=namespace, verify=verify, timeout=timeout)

        return cls(factory, token=token, mount=keys.vault_mount, key_prefix=keys.vault_key_prefix,
                   derived=keys.vault_derived)

    def key_name(self, tenant_id: str) -> str:
        return f"{self.key_prefix}-{tenant_id}"

    def _context(self, tenant_id: str) -> str | None:
        return base64.b64encode(tenant_id.encode("utf-8")).decode("ascii") if self.derived else None

    # -- calling Vault --

    def _client(self) -> Any:
        if getattr(self._local, "generation", None) != self._generation:
            self._local.client = self._factory(self._token)
            self._local.generation = self._generation
        return self._local.client

    def _reload_token(self) -> bool:
        """Re-read the token (a token file may have been renewed); True if it changed."""
        fresh = self._read_token()
        with self._lock:
            if fresh == self._token:
                return False
            self._token = fresh
            self._generation += 1
            return True

    def _with_client(self, fn: Callable[[Any], _T]) -> _T:
        import hvac.exceptions

        try:
            return fn(self._client())
        except hvac.exceptions.Forbidden:
            if not self._reload_token():
                raise
        return fn(self._client())

    async def _call(self, operation: str, tenant_id: str, fn: Callable[[Any], _T], *,
                    refused: type[Exception]) -> _T:
        """Run ``fn(client)`` in a worker thread, mapping its errors (see the module doc)."""
        try:
            return await asyncio.to_thread(self._with_client, fn)
        except Exception as exc:  # noqa: BLE001 - mapped below, never leaked
            raise self._map(exc, operation, tenant_id, refused) from None

    @staticmethod
    def _map(exc: Exception, operation: str, tenant_id: str, refused: type[Exception]) -> Exception:
        import hvac.exceptions
        import requests

        if isinstance(exc, ConfigError):  # the token file went away
            log.warning("key provider token unreadable", extra={"provider": "vault-transit", "operation": operation})
            return ServiceUnavailableError("the key provider is unavailable")
        if isinstance(exc, hvac.exceptions.VaultError):
            status = getattr(exc, "status_code", None) or 0
            log.warning(
                "key provider error",
                extra={"provider": "vault-transit", "operation": operation, "tenant_id": tenant_id,
                       "error_code": f"http_{status}" if status else type(exc).__name__},
            )
            if isinstance(exc, hvac.exceptions.InvalidRequest | hvac.exceptions.Unauthorized
                          | hvac.exceptions.Forbidden | hvac.exceptions.InvalidPath
                          | hvac.exceptions.UnsupportedOperation):
                return DecryptionError() if refused is DecryptionError else refused(
                    "the key provider refused the request")
            return ServiceUnavailableError("the key provider is unavailable")
        if isinstance(exc, requests.exceptions.RequestException):
            log.warning(
                "key provider unreachable",
                extra={"provider": "vault-transit", "operation": operation, "error_code": type(exc).__name__},
            )
            return ServiceUnavailableError("the key provider is unavailable")
        if isinstance(exc, KeyError | TypeError | ValueError):  # an answer without the expected fields
            return DecryptionError() if refused is DecryptionError else ServiceUnavailableError(
                "the key provider gave an unexpected answer")
        return exc

    def _exists(self, client: Any, name: str) -> bool:
        import hvac.exceptions

        try:
            client.secrets.transit.read_key(name=name, mount_point=self.mount)
        except hvac.exceptions.InvalidPath:
            return False
        return True

    def _latest(self, client: Any, name: str) -> int | None:
        import hvac.exceptions

        try:
            answer = client.secrets.transit.read_key(name=name, mount_point=self.mount)
        except hvac.exceptions.InvalidPath:
            return None
        return int(answer["data"]["latest_version"])

    # -- KeyProvider --

    async def wrap(self, dek: bytes, *, tenant_id: str) -> bytes:
        if len(dek) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        name, context = self.key_name(tenant_id), self._context(tenant_id)
        plaintext = base64.b64encode(bytes(dek)).decode("ascii")

        def go(client: Any) -> bytes:
            transit = client.secrets.transit
            transit.create_key(name=name, key_type=KEY_TYPE, derived=self.derived, mount_point=self.mount)
            answer = transit.encrypt_data(name=name, plaintext=plaintext, context=context, mount_point=self.mount)
            return str(answer["data"]["ciphertext"]).encode("ascii")

        return await self._call("encrypt", tenant_id, go, refused=DecryptionError)

    async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        if not isinstance(blob, bytes | bytearray) or not _CIPHERTEXT_RE.fullmatch(bytes(blob)):
            raise DecryptionError
        name, context, ciphertext = self.key_name(tenant_id), self._context(tenant_id), bytes(blob).decode("ascii")

        def go(client: Any) -> str:
            answer = client.secrets.transit.decrypt_data(
                name=name, ciphertext=ciphertext, context=context, mount_point=self.mount
            )
            return str(answer["data"]["plaintext"])

        encoded = await self._call("decrypt", tenant_id, go, refused=DecryptionError)
        try:
            dek = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise DecryptionError from None
        if len(dek) != KEY_BYTES:
            raise DecryptionError
        return dek

    async def shred(self, tenant_id: str) -> None:
        name = self.key_name(tenant_id)

        def go(client: Any) -> None:
            if not self._exists(client, name):
                return  # nothing to shred, or shredded already
            transit = client.secrets.transit
            transit.update_key_configuration(name=name, deletion_allowed=True, mount_point=self.mount)
            transit.delete_key(name=name, mount_point=self.mount)

        await self._call("delete", tenant_id, go, refused=ServiceUnavailableError)

    # -- RotatingKeyProvider --

    async def rotate_kek(self, tenant_ids: Sequence[str]) -> int:
        rotated = 0
        for tenant_id in tenant_ids:
            name = self.key_name(tenant_id)

            def go(client: Any, name: str = name) -> bool:
                if not self._exists(client, name):
                    return False
                client.secrets.transit.rotate_key(name=name, mount_point=self.mount)
                return True

            if await self._call("rotate", tenant_id, go, refused=ServiceUnavailableError):
                rotated += 1
        return rotated

    async def rewrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        if not isinstance(blob, bytes | bytearray) or not _CIPHERTEXT_RE.fullmatch(bytes(blob)):
            raise DecryptionError
        name, context, ciphertext = self.key_name(tenant_id), self._context(tenant_id), bytes(blob).decode("ascii")

        def go(client: Any) -> bytes:
            answer = client.secrets.transit.rewrap_data(
                name=name, ciphertext=ciphertext, context=context, mount_point=self.mount
            )
            return str(answer["data"]["ciphertext"]).encode("ascii")

        return await self._call("rewrap", tenant_id, go, refused=DecryptionError)

    def kek_version(self, blob: bytes) -> int | None:
        found = _CIPHERTEXT_RE.fullmatch(bytes(blob)) if isinstance(blob, bytes | bytearray) else None
        return int(found.group(1)) if found else None

    async def current_kek_version(self, tenant_id: str) -> int | None:
        name = self.key_name(tenant_id)
        return await self._call("read", tenant_id, lambda client: self._latest(client, name),
                                refused=ServiceUnavailableError)

    async def retire_old_keks(self, tenant_ids: Sequence[str]) -> None:
        """Set each tenant key's ``min_decryption_version`` to its latest version."""
        for tenant_id in tenant_ids:
            name = self.key_name(tenant_id)

            def go(client: Any, name: str = name) -> None:
                latest = self._latest(client, name)
                if latest is not None:
                    client.secrets.transit.update_key_configuration(
                        name=name, min_decryption_version=latest, mount_point=self.mount
                    )

            await self._call("config", tenant_id, go, refused=ServiceUnavailableError)
