"""AWS KMS as the key provider: one KMS key per tenant, so a tenant can be crypto-shredded alone.

* **Key per tenant.** Created on the tenant's first wrap (``CreateKey``, symmetric, tagged
  ``skyfleet:tenant=<id>``, automatic yearly rotation on) and named by the alias
  ``<alias prefix>/<tenant id>``. Two processes racing to create it: the loser's ``CreateAlias``
  fails, it schedules its own key for deletion and uses the winner's.
* **Wrap / unwrap** are ``Encrypt`` / ``Decrypt`` of the 32-byte DEK with
  ``EncryptionContext={"skyfleet:tenant": <tenant id>}``: KMS authenticates the context, so a
  wrapped DEK opens only for its tenant (and the context shows in CloudTrail). ``Decrypt`` also
  names the alias, so a blob of another key is refused. The stored blob is KMS's
  ``CiphertextBlob`` as is.
* **Shred** = ``DisableKey`` then ``ScheduleKeyDeletion`` (``PendingWindowInDays``, 7 by default,
  the AWS minimum). Unwrapping fails at once (the key is disabled, then pending deletion); the
  key material is destroyed by AWS when the window ends. Until then an operator holding
  ``kms:CancelKeyDeletion`` can undo a mistaken shred; after it, nothing can.
* **KEK rotation** (``skyfleet keys rotate-kek``) = ``RotateKeyOnDemand`` per tenant key (new
  backing key material, same key id), then ``ReEncrypt`` of every stored wrapped DEK (done inside
  KMS: the DEK never leaves it). Where on-demand rotation is not available (keys with imported
  material or in a custom key store, the per-key on-demand quota used up, a KMS-compatible
  endpoint without the API) the DEKs are re-encrypted under the key's current material only,
  which the yearly automatic rotation renews. KMS keeps every backing key of a key until the key
  itself is deleted, so there is nothing to retire.

Errors are mapped at this boundary: a refusal (access denied, no such key, disabled or pending
deletion, invalid ciphertext or context) is one opaque :class:`DecryptionError` (fail closed);
throttling, KMS-side failures and network errors are :class:`ServiceUnavailableError`. Error
codes are logged (never key material, blobs or credentials).

boto3 is synchronous: every call runs in a worker thread (``asyncio.to_thread``); boto3 clients
are thread-safe. Credentials come from boto3's standard chain (environment, shared config,
container or instance role).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from skyfleet.config import ConfigError
from skyfleet.crypto.cipher import KEY_BYTES
from skyfleet.crypto.errors import DecryptionError
from skyfleet.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from skyfleet.config import KeySettings

log = logging.getLogger("skyfleet.crypto")

_T = TypeVar("_T")

CONTEXT_KEY = "skyfleet:tenant"
TAG_TENANT = "skyfleet:tenant"
TAG_PURPOSE = "skyfleet:purpose"

#: Codes that mean "this blob will not open here": one opaque DecryptionError.
REFUSED = frozenset({
    "AccessDeniedException",
    "DisabledException",
    "IncorrectKeyException",
    "InvalidCiphertextException",
    "InvalidGrantTokenException",
    "InvalidKeyUsageException",
    "KMSInvalidStateException",
    "NotFoundException",
    "UnrecognizedClientException",
    "ValidationException",
})
#: Codes that mean "try again later".
UNAVAILABLE = frozenset({
    "DependencyTimeoutException",
    "KMSInternalException",
    "KeyUnavailableException",
    "LimitExceededException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "ThrottlingException",
})
#: RotateKeyOnDemand refusals that mean "not for this key": re-encrypt only.
NO_ON_DEMAND_ROTATION = frozenset({
    "UnsupportedOperationException",
    "LimitExceededException",
    "ConflictException",
    "UnknownOperationException",
    "InvalidAction",
})


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError``; None for anything else."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


class AwsKmsProvider:
    """Per-tenant KMS keys (see the module doc)."""

    name = "aws-kms"

    def __init__(self, client: Any, *, alias_prefix: str = "alias/skyfleet", pending_window_days: int = 7) -> None:
        """``client``: a boto3 KMS client (see :meth:`open`)."""
        if not 7 <= pending_window_days <= 30:
            raise ValueError("KMS allows a pending window of 7 to 30 days")
        self._kms = client
        self.alias_prefix = alias_prefix.rstrip("/")
        self.pending_window_days = pending_window_days

    @classmethod
    def open(cls, keys: KeySettings, *, max_attempts: int = 3) -> AwsKmsProvider:
        """A provider with a boto3 client built from the ``keys`` settings (blocking: loads botocore)."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - boto3 is installed with the [aws] extra
            raise ConfigError(
                "keys.provider 'aws-kms' needs boto3: install skyfleet with the [aws] extra"
            ) from None
        config = Config(
            connect_timeout=keys.request_timeout_s,
            read_timeout=keys.request_timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts},
            user_agent_extra="skyfleet",
        )
        client = boto3.session.Session().client(
            "kms", region_name=keys.kms_region, endpoint_url=keys.kms_endpoint_url, config=config
        )
        return cls(client, alias_prefix=keys.kms_alias_prefix, pending_window_days=keys.kms_pending_window_days)

    def alias(self, tenant_id: str) -> str:
        return f"{self.alias_prefix}/{tenant_id}"

    @staticmethod
    def _context(tenant_id: str) -> dict[str, str]:
        return {CONTEXT_KEY: tenant_id}

    # -- calling KMS --

    async def _call(self, operation: str, tenant_id: str, fn: Callable[[], _T], *, refused: type[Exception]) -> _T:
        """Run ``fn`` (one KMS call) in a worker thread, mapping its errors (see the module doc)."""
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:  # noqa: BLE001 - mapped below, never leaked
            raise self._map(exc, operation, tenant_id, refused) from None

    @staticmethod
    def _map(exc: Exception, operation: str, tenant_id: str, refused: type[Exception]) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError

        code = error_code(exc)
        if isinstance(exc, ClientError):
            unavailable = code in UNAVAILABLE or (code not in REFUSED and _status(exc) >= 500)
            log.warning(
                "key provider error",
                extra={"provider": "aws-kms", "operation": operation, "tenant_id": tenant_id, "error_code": code},
            )
            if unavailable:
                return ServiceUnavailableError("the key provider is unavailable")
            return DecryptionError() if refused is DecryptionError else refused("the key provider refused the request")
        if isinstance(exc, BotoCoreError):  # network, timeouts, no credentials
            log.warning(
                "key provider unreachable",
                extra={"provider": "aws-kms", "operation": operation, "error_code": type(exc).__name__},
            )
            return ServiceUnavailableError("the key provider is unavailable")
        return exc

    def _describe(self, tenant_id: str) -> dict[str, Any] | None:
        """The tenant key's metadata; None if the tenant has none (blocking)."""
        from botocore.exceptions import ClientError

        try:
            return dict(self._kms.describe_key(KeyId=self.alias(tenant_id))["KeyMetadata"])
        except ClientError as exc:
            if error_code(exc) == "NotFoundException":
                return None
            raise

    def _create_key(self, tenant_id: str) -> None:
        """Create the tenant's key and alias; if another process won the race, use its key (blocking)."""
        from botocore.exceptions import ClientError

        key_id = self._kms.create_key(
            Description=f"skyfleet key-encryption key of tenant {tenant_id}",
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            Tags=[
                {"TagKey": TAG_TENANT, "TagValue": tenant_id},
                {"TagKey": TAG_PURPOSE, "TagValue": "tenant-kek"},
            ],
        )["KeyMetadata"]["KeyId"]
        try:
            self._kms.enable_key_rotation(KeyId=key_id)
            self._kms.create_alias(AliasName=self.alias(tenant_id), TargetKeyId=key_id)
        except ClientError as exc:
            try:  # never leave an orphan key behind
                self._kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=self.pending_window_days)
            except ClientError:
                log.warning("could not delete an unused KMS key", extra={"provider": "aws-kms"})
            if error_code(exc) != "AlreadyExistsException":
                raise

    def _encrypt(self, dek: bytes, tenant_id: str) -> bytes:
        from botocore.exceptions import ClientError

        request = {"KeyId": self.alias(tenant_id), "Plaintext": dek, "EncryptionContext": self._context(tenant_id)}
        try:
            return bytes(self._kms.encrypt(**request)["CiphertextBlob"])
        except ClientError as exc:
            if error_code(exc) != "NotFoundException":
                raise
        self._create_key(tenant_id)
        return bytes(self._kms.encrypt(**request)["CiphertextBlob"])

    def _decrypt(self, blob: bytes, tenant_id: str) -> bytes:
        answer = self._kms.decrypt(
            CiphertextBlob=blob,
            KeyId=self.alias(tenant_id),
            EncryptionContext=self._context(tenant_id),
            EncryptionAlgorithm="SYMMETRIC_DEFAULT",
        )
        return bytes(answer["Plaintext"])

    def _destroy(self, tenant_id: str) -> None:
        meta = self._describe(tenant_id)
        if meta is None or meta.get("KeyState") in ("PendingDeletion", "PendingReplicaDeletion"):
            return  # nothing to shred, or shredded already
        key_id = meta["KeyId"]
        if meta.get("KeyState") != "Disabled":
            self._kms.disable_key(KeyId=key_id)
        self._kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=self.pending_window_days)

    def _rotate(self, tenant_id: str) -> bool:
        from botocore.exceptions import ClientError

        meta = self._describe(tenant_id)
        if meta is None:
            return False
        try:
            self._kms.rotate_key_on_demand(KeyId=meta["KeyId"])
        except ClientError as exc:
            if error_code(exc) not in NO_ON_DEMAND_ROTATION:
                raise
            log.info(
                "on-demand KMS rotation unavailable; re-encrypting under the current material",
                extra={"provider": "aws-kms", "tenant_id": tenant_id, "error_code": error_code(exc)},
            )
            return False
        return True

    def _reencrypt(self, blob: bytes, tenant_id: str) -> bytes:
        alias, context = self.alias(tenant_id), self._context(tenant_id)
        answer = self._kms.re_encrypt(
            CiphertextBlob=blob,
            SourceKeyId=alias,
            SourceEncryptionContext=context,
            DestinationKeyId=alias,
            DestinationEncryptionContext=context,
        )
        return bytes(answer["CiphertextBlob"])

    # -- KeyProvider --

    async def wrap(self, dek: bytes, *, tenant_id: str) -> bytes:
        if len(dek) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        return await self._call("Encrypt", tenant_id, lambda: self._encrypt(bytes(dek), tenant_id),
                                refused=DecryptionError)

    async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        if not isinstance(blob, bytes | bytearray) or not blob:
            raise DecryptionError
        dek = await self._call("Decrypt", tenant_id, lambda: self._decrypt(bytes(blob), tenant_id),
                               refused=DecryptionError)
        if len(dek) != KEY_BYTES:
            raise DecryptionError
        return dek

    async def shred(self, tenant_id: str) -> None:
        await self._call("ScheduleKeyDeletion", tenant_id, lambda: self._destroy(tenant_id),
                         refused=ServiceUnavailableError)

    # -- RotatingKeyProvider --

    async def rotate_kek(self, tenant_ids: Sequence[str]) -> int:
        rotated = 0
        for tenant_id in tenant_ids:
            if await self._call("RotateKeyOnDemand", tenant_id, lambda t=tenant_id: self._rotate(t),
                                refused=ServiceUnavailableError):
                rotated += 1
        return rotated

    async def rewrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        return await self._call("ReEncrypt", tenant_id, lambda: self._reencrypt(bytes(blob), tenant_id),
                                refused=DecryptionError)

    def kek_version(self, blob: bytes) -> int | None:
        return None  # KMS ciphertext does not say which backing key sealed it

    async def current_kek_version(self, tenant_id: str) -> int | None:
        return None  # Encrypt and ReEncrypt always use the key's current backing key

    async def retire_old_keks(self, tenant_ids: Sequence[str]) -> None:
        """Nothing to do: KMS keeps a key's older backing keys until the key itself is deleted."""
