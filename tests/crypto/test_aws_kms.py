"""AwsKmsProvider through boto3 against moto's KMS (tests/crypto/kms_fake.py), not real AWS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from skyfleet.config import ConfigError, KeySettings, load_settings
from skyfleet.crypto import DecryptionError, RotatingKeyProvider, provider_from_keys
from skyfleet.crypto.providers.aws_kms import AwsKmsProvider
from skyfleet.errors import ServiceUnavailableError
from tests.crypto.kms_fake import REGION, fake_credentials, mocked_kms

DEK = bytes(range(32))
OTHER = bytes(range(1, 33))


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A boto3 KMS client on moto's in-process KMS."""
    with mocked_kms(monkeypatch):
        yield boto3.client("kms", region_name=REGION)


def provider_for(**fields: Any) -> AwsKmsProvider:
    provider = provider_from_keys(KeySettings(provider="aws-kms", kms_region=REGION, **fields), Path("/nonexistent"))
    assert isinstance(provider, AwsKmsProvider) and isinstance(provider, RotatingKeyProvider)
    return provider


def key_of(kms: Any, alias: str) -> dict[str, Any]:
    return dict(kms.describe_key(KeyId=alias)["KeyMetadata"])


async def test_first_wrap_creates_a_tagged_rotating_key_per_tenant(kms: Any) -> None:
    provider = provider_for()
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert DEK not in blob
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    meta = key_of(kms, "alias/skyfleet/ten_a")
    assert meta["KeyState"] == "Enabled" and meta["KeyUsage"] == "ENCRYPT_DECRYPT"
    tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=meta["KeyId"])["Tags"]}
    assert tags == {"skyfleet:tenant": "ten_a", "skyfleet:purpose": "tenant-kek"}
    assert kms.get_key_rotation_status(KeyId=meta["KeyId"])["KeyRotationEnabled"]
    await provider.wrap(OTHER, tenant_id="ten_a")  # reuses the key
    await provider.wrap(OTHER, tenant_id="ten_b")
    keys = {key_of(kms, f"alias/skyfleet/{t}")["KeyId"] for t in ("ten_a", "ten_b")}
    assert len(keys) == 2 and len(kms.list_keys()["Keys"]) == 2
    with pytest.raises(DecryptionError):  # ten_a's blob does not open as ten_b's
        await provider.unwrap(blob, tenant_id="ten_b")


async def test_the_encryption_context_binds_a_blob_to_its_tenant(kms: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = provider_for(kms_alias_prefix="alias/shared")
    monkeypatch.setattr(provider, "alias", lambda tenant_id: "alias/shared/one-key")  # one key, two contexts
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    with pytest.raises(DecryptionError):
        await provider.unwrap(blob, tenant_id="ten_b")
    with pytest.raises(DecryptionError):
        await provider.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), tenant_id="ten_a")
    for bad in (b"", b"x"):
        with pytest.raises(DecryptionError):
            await provider.unwrap(bad, tenant_id="ten_a")


async def test_losing_a_creation_race_uses_the_winners_key(kms: Any) -> None:
    first, second = provider_for(), provider_for()
    await asyncio.to_thread(first._create_key, "ten_a")
    await asyncio.to_thread(second._create_key, "ten_a")  # CreateAlias fails: AlreadyExists
    states = sorted(key_of(kms, k["KeyId"])["KeyState"] for k in kms.list_keys()["Keys"])
    assert states == ["Enabled", "PendingDeletion"]  # the loser's key does not linger
    blob = await second.wrap(DEK, tenant_id="ten_a")
    assert await first.unwrap(blob, tenant_id="ten_a") == DEK
    blobs = await asyncio.gather(*(provider_for().wrap(DEK, tenant_id="ten_c") for _ in range(4)))
    assert [await first.unwrap(b, tenant_id="ten_c") for b in blobs] == [DEK] * 4


async def test_shred_disables_and_schedules_deletion(kms: Any) -> None:
    provider = provider_for()
    blob_a = await provider.wrap(DEK, tenant_id="ten_a")
    blob_b = await provider.wrap(OTHER, tenant_id="ten_b")
    await provider.shred("ten_a")
    meta = key_of(kms, "alias/skyfleet/ten_a")
    assert meta["KeyState"] == "PendingDeletion" and not meta["Enabled"]
    window = meta["DeletionDate"] - datetime.now(UTC)
    assert timedelta(days=6, hours=23) < window <= timedelta(days=7)
    with pytest.raises(DecryptionError):  # at once
        await provider.unwrap(blob_a, tenant_id="ten_a")
    with pytest.raises(DecryptionError):  # and no new data under the doomed key
        await provider.wrap(DEK, tenant_id="ten_a")
    assert await provider.unwrap(blob_b, tenant_id="ten_b") == OTHER
    await provider.shred("ten_a")  # idempotent
    await provider.shred("ten_never_seen")


async def test_rotation_on_demand_then_reencrypt(kms: Any) -> None:
    provider = provider_for()
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert await provider.rotate_kek(["ten_a", "ten_unknown"]) == 1
    key_id = key_of(kms, "alias/skyfleet/ten_a")["KeyId"]
    assert [r["RotationType"] for r in kms.list_key_rotations(KeyId=key_id)["Rotations"]] == ["ON_DEMAND"]
    fresh = await provider.rewrap(blob, tenant_id="ten_a")
    assert fresh != blob and await provider.unwrap(fresh, tenant_id="ten_a") == DEK
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK  # KMS keeps old backing keys
    assert provider.kek_version(fresh) is None and await provider.current_kek_version("ten_a") is None
    await provider.retire_old_keks(["ten_a"])  # nothing to do for KMS
    with pytest.raises(DecryptionError):
        await provider.rewrap(blob, tenant_id="ten_b")


async def test_without_on_demand_rotation_it_only_reencrypts(kms: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.core.exceptions import JsonRESTError
    from moto.kms.models import KmsBackend

    def unsupported(self: Any, key_id: str) -> str:
        raise JsonRESTError("UnsupportedOperationException", "on-demand rotation is not supported for this key")

    provider = provider_for()
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    monkeypatch.setattr(KmsBackend, "rotate_key_on_demand", unsupported)
    assert await provider.rotate_kek(["ten_a"]) == 0
    assert await provider.unwrap(await provider.rewrap(blob, tenant_id="ten_a"), tenant_id="ten_a") == DEK


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("AccessDeniedException", DecryptionError),
        ("IncorrectKeyException", DecryptionError),
        ("InvalidCiphertextException", DecryptionError),
        ("ThrottlingException", ServiceUnavailableError),
        ("KMSInternalException", ServiceUnavailableError),
        ("KeyUnavailableException", ServiceUnavailableError),
    ],
)
async def test_errors_are_mapped_at_the_boundary(
    kms: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: str,
    expected: type[Exception],
) -> None:
    from moto.core.exceptions import JsonRESTError
    from moto.kms.models import KmsBackend

    keys = KeySettings(provider="aws-kms", kms_region=REGION)
    provider = AwsKmsProvider.open(keys, max_attempts=1)  # no retry back-off in tests
    blob = await provider.wrap(DEK, tenant_id="ten_a")

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise JsonRESTError(code, "refused")

    monkeypatch.setattr(KmsBackend, "decrypt", failing)
    caplog.set_level(logging.DEBUG, logger="skyfleet")
    with pytest.raises(expected) as raised:
        await provider.unwrap(blob, tenant_id="ten_a")
    assert "refused" not in str(raised.value)  # opaque
    [record] = [r for r in caplog.records if r.name == "skyfleet.crypto"]
    assert record.error_code == code and record.tenant_id == "ten_a"  # type: ignore[attr-defined]
    assert blob.hex() not in caplog.text and DEK.hex() not in caplog.text


async def test_network_failure_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_credentials(monkeypatch)
    keys = KeySettings(provider="aws-kms", kms_region=REGION, kms_endpoint_url="http://127.0.0.1:9",
                       request_timeout_s=2)
    provider = AwsKmsProvider.open(keys, max_attempts=1)
    with pytest.raises(ServiceUnavailableError):
        await provider.wrap(DEK, tenant_id="ten_a")
    with pytest.raises(ServiceUnavailableError):
        await provider.unwrap(b"blob", tenant_id="ten_a")
    with pytest.raises(ServiceUnavailableError):
        await provider.shred("ten_a")


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFLEET_KEYS__PROVIDER", "aws-kms")
    with pytest.raises(ConfigError, match=r"keys\.kms_region is required"):
        load_settings()
    monkeypatch.setenv("SKYFLEET_KEYS__KMS_REGION", "eu-west-1")
    assert load_settings().keys.kms_alias_prefix == "alias/skyfleet"
    for prefix in ("alias/aws/x", "skyfleet", "alias/", "alias/a b", "alias/x/"):
        monkeypatch.setenv("SKYFLEET_KEYS__KMS_ALIAS_PREFIX", prefix)
        with pytest.raises(ConfigError, match="kms_alias_prefix"):
            load_settings()
    monkeypatch.delenv("SKYFLEET_KEYS__KMS_ALIAS_PREFIX")
    monkeypatch.setenv("SKYFLEET_KEYS__KMS_ENDPOINT_URL", "http://kms.example.com")
    with pytest.raises(ConfigError, match="https://"):
        load_settings()
    monkeypatch.setenv("SKYFLEET_KEYS__KMS_ENDPOINT_URL", "http://127.0.0.1:4566")
    load_settings()
    monkeypatch.setenv("SKYFLEET_KEYS__VAULT_URL", "https://vault:8200")
    with pytest.raises(ConfigError, match=r"keys\.vault_url is set but keys\.provider is .aws-kms."):
        load_settings()
    monkeypatch.setenv("SKYFLEET_KEYS__PROVIDER", "local")
    with pytest.raises(ConfigError, match=r"is set but keys\.provider is .local."):
        load_settings()
