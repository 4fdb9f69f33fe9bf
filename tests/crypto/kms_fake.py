"""AWS KMS for tests: moto's ``mock_aws`` (in-process, behind boto3), not real AWS.

moto does not model a key's state in cryptographic operations (it decrypts with a disabled key
or one pending deletion). :func:`enforce_key_state` adds AWS's documented behaviour: Encrypt,
Decrypt and ReEncrypt with a disabled key fail with ``DisabledException``, with a key pending
deletion with ``KMSInvalidStateException``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

REGION = "eu-west-1"


def _check_state(backend: Any, key_id: str) -> None:
    from moto.core.exceptions import JsonRESTError

    key = backend.keys[key_id]
    if key.key_state == "Disabled":
        raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
    if key.key_state == "PendingDeletion":
        raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is pending deletion.")


def enforce_key_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.kms.models import KmsBackend

    encrypt, decrypt = KmsBackend.encrypt, KmsBackend.decrypt

    def checked_encrypt(self: Any, key_id: str, plaintext: bytes, encryption_context: dict[str, str]) -> Any:
        _check_state(self, self.any_id_to_key_id(key_id))
        return encrypt(self, key_id, plaintext, encryption_context)

    def checked_decrypt(self: Any, ciphertext_blob: bytes, encryption_context: dict[str, str],
                        key_id: str | None = None) -> Any:
        plaintext, arn = decrypt(self, ciphertext_blob, encryption_context, key_id)
        _check_state(self, arn.rsplit("/", 1)[-1])
        return plaintext, arn

    monkeypatch.setattr(KmsBackend, "encrypt", checked_encrypt)
    monkeypatch.setattr(KmsBackend, "decrypt", checked_decrypt)


def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextmanager
def mocked_kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws

    fake_credentials(monkeypatch)
    with mock_aws():
        enforce_key_state(monkeypatch)
        yield
