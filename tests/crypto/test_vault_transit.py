"""VaultTransitProvider through the real hvac client against the fake Vault Transit server
(tests/fakes/vault_transit.py: no Vault binary is available here)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyfleet.config import ConfigError, KeySettings, load_settings
from skyfleet.crypto import DecryptionError, RotatingKeyProvider, provider_from_keys
from skyfleet.crypto.providers.vault_transit import VaultTransitProvider
from skyfleet.errors import ServiceUnavailableError
from tests.fakes.vault_transit import FakeVaultTransit

TOKEN = "hvs.test-token-0123456789"
DEK = bytes(range(32))
OTHER = bytes(range(1, 33))


@pytest.fixture
def vault() -> Iterator[FakeVaultTransit]:
    with FakeVaultTransit(token=TOKEN) as fake:
        yield fake


def provider_for(vault: FakeVaultTransit, **fields: object) -> VaultTransitProvider:
    keys = KeySettings(provider="vault-transit", vault_url=vault.url, **{"vault_token": TOKEN, **fields})
    provider = provider_from_keys(keys, Path("/nonexistent"))
    assert isinstance(provider, VaultTransitProvider) and isinstance(provider, RotatingKeyProvider)
    return provider


async def test_wrap_creates_a_derived_key_per_tenant_and_unwraps(vault: FakeVaultTransit) -> None:
    provider = provider_for(vault)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert blob.startswith(b"vault:v1:") and DEK not in blob
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    key = vault.key("skyfleet-ten_a")
    assert key is not None and key.derived and key.latest_version == 1
    await provider.wrap(OTHER, tenant_id="ten_a")  # the existing key is reused, not replaced
    assert vault.key("skyfleet-ten_a") is key and key.latest_version == 1
    with pytest.raises(DecryptionError):  # ten_b's key does not exist
        await provider.unwrap(blob, tenant_id="ten_b")
    await provider.wrap(OTHER, tenant_id="ten_b")
    with pytest.raises(DecryptionError):  # ... nor opens ten_a's blob once it exists
        await provider.unwrap(blob, tenant_id="ten_b")


async def test_the_context_binds_a_blob_to_its_tenant(vault: FakeVaultTransit, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = provider_for(vault)
    monkeypatch.setattr(provider, "key_name", lambda tenant_id: "shared")  # one key, two contexts
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    with pytest.raises(DecryptionError):
        await provider.unwrap(blob, tenant_id="ten_b")


async def test_underived_keys_work_without_a_context(vault: FakeVaultTransit) -> None:
    provider = provider_for(vault, vault_derived=False, vault_key_prefix="plain", vault_mount="transit")
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    key = vault.key("plain-ten_a")
    assert key is not None and not key.derived


async def test_tampered_or_foreign_blobs_fail_closed(vault: FakeVaultTransit) -> None:
    provider = provider_for(vault)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    head, _, body = blob.rpartition(b":")
    flipped = head + b":" + (b"A" if body[:1] != b"A" else b"B") + body[1:]
    for bad in (flipped, b"vault:v9:" + body, b"vault:v1:", b"", b"not vault", blob + b"\x00", b"vault:v0:" + body):
        with pytest.raises(DecryptionError):
            await provider.unwrap(bad, tenant_id="ten_a")


async def test_shred_deletes_the_key(vault: FakeVaultTransit) -> None:
    provider = provider_for(vault)
    blob_a = await provider.wrap(DEK, tenant_id="ten_a")
    blob_b = await provider.wrap(OTHER, tenant_id="ten_b")
    await provider.shred("ten_a")
    assert vault.key("skyfleet-ten_a") is None
    with pytest.raises(DecryptionError):
        await provider.unwrap(blob_a, tenant_id="ten_a")
    assert await provider.unwrap(blob_b, tenant_id="ten_b") == OTHER  # others untouched
    await provider.shred("ten_a")  # idempotent
    await provider.shred("ten_never_seen")
    deletes = [r for r in vault.requests if r[0] == "DELETE"]
    assert deletes == [("DELETE", "/v1/transit/keys/skyfleet-ten_a", "")]


async def test_rotate_rewrap_and_retire(vault: FakeVaultTransit) -> None:
    provider = provider_for(vault)
    old = await provider.wrap(DEK, tenant_id="ten_a")
    assert provider.kek_version(old) == 1 and await provider.current_kek_version("ten_a") == 1
    assert await provider.rotate_kek(["ten_a", "ten_unknown"]) == 1
    assert await provider.current_kek_version("ten_a") == 2
    assert await provider.current_kek_version("ten_unknown") is None
    assert await provider.unwrap(old, tenant_id="ten_a") == DEK  # old versions still open
    new = await provider.rewrap(old, tenant_id="ten_a")
    assert provider.kek_version(new) == 2 and new.startswith(b"vault:v2:")
    assert provider.kek_version(await provider.wrap(OTHER, tenant_id="ten_a")) == 2
    await provider.retire_old_keks(["ten_a", "ten_unknown"])
    key = vault.key("skyfleet-ten_a")
    assert key is not None and key.min_decryption_version == 2
    with pytest.raises(DecryptionError):
        await provider.unwrap(old, tenant_id="ten_a")
    assert await provider.unwrap(new, tenant_id="ten_a") == DEK


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_vault_side_failures_are_unavailable_not_undecryptable(vault: FakeVaultTransit, status: int) -> None:
    provider = provider_for(vault)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    vault.fail_next.append(status)
    with pytest.raises(ServiceUnavailableError):
        await provider.unwrap(blob, tenant_id="ten_a")
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK


async def test_network_failure_is_unavailable(vault: FakeVaultTransit) -> None:
    provider = provider_for(vault)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    vault.stop()
    with pytest.raises(ServiceUnavailableError):
        await provider.unwrap(blob, tenant_id="ten_a")
    with pytest.raises(ServiceUnavailableError):
        await provider.wrap(DEK, tenant_id="ten_a")


async def test_a_refused_token_fails_closed_and_is_never_logged(
    vault: FakeVaultTransit, caplog: pytest.LogCaptureFixture
) -> None:
    provider = provider_for(vault)
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    vault.token = "hvs.another-token"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DecryptionError) as raised:
        await provider.unwrap(blob, tenant_id="ten_a")
    with pytest.raises(ServiceUnavailableError):  # shred must not pass silently
        await provider.shred("ten_a")
    assert TOKEN not in caplog.text and "another-token" not in caplog.text
    assert TOKEN not in str(raised.value) and blob.decode() not in caplog.text


async def test_token_file_is_reread_when_vault_refuses_the_token(vault: FakeVaultTransit, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    keys = KeySettings(provider="vault-transit", vault_url=vault.url, vault_token_file=token_file)
    provider = provider_from_keys(keys, tmp_path / "unused")
    blob = await provider.wrap(DEK, tenant_id="ten_a")
    vault.token = "hvs.renewed"  # Vault Agent renewed the token and rewrote its sink
    token_file.write_text("hvs.renewed\n")
    assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
    token_file.unlink()  # the sink is gone and Vault refuses: unavailable, not undecryptable
    vault.token = "hvs.third"
    with pytest.raises(ServiceUnavailableError):
        await provider.unwrap(blob, tenant_id="ten_a")


async def test_namespace_and_mount_are_used(tmp_path: Path) -> None:
    with FakeVaultTransit(token=TOKEN, mount="kms/transit") as vault:
        provider = provider_for(vault, vault_namespace="team-a/", vault_mount="kms/transit")
        blob = await provider.wrap(DEK, tenant_id="ten_a")
        assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
        assert vault.key("skyfleet-ten_a", "team-a") is not None and vault.key("skyfleet-ten_a") is None
        assert {(path.split("/")[2], ns) for _, path, ns in vault.requests} == {("kms", "team-a")}


async def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    from skyfleet.iam.certs import make_dev_certs

    certs = make_dev_certs(tmp_path / "certs")
    with FakeVaultTransit(token=TOKEN, tls=(certs.server_cert, certs.server_key)) as vault:
        assert vault.url.startswith("https://")
        provider = provider_for(vault, vault_ca_file=certs.ca_cert)
        blob = await provider.wrap(DEK, tenant_id="ten_a")
        assert await provider.unwrap(blob, tenant_id="ten_a") == DEK
        untrusting = provider_for(vault)  # the system CAs do not know the dev CA
        with pytest.raises(ServiceUnavailableError):
            await untrusting.unwrap(blob, tenant_id="ten_a")


def test_settings_require_the_vault_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFLEET_KEYS__PROVIDER", "vault-transit")
    with pytest.raises(ConfigError, match=r"keys\.vault_url is required"):
        load_settings()
    monkeypatch.setenv("SKYFLEET_KEYS__VAULT_URL", "http://vault.example.com:8200")
    monkeypatch.setenv("SKYFLEET_KEYS__VAULT_TOKEN", "hvs.s3cret-value")
    with pytest.raises(ConfigError, match="https://"):
        load_settings()
    monkeypatch.setenv("SKYFLEET_KEYS__VAULT_URL", "https://vault.example.com:8200")
    settings = load_settings()
    assert settings.keys.vault_token is not None and "s3cret" not in repr(settings)
    monkeypatch.setenv("SKYFLEET_KEYS__VAULT_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_settings()
    monkeypatch.delenv("SKYFLEET_KEYS__VAULT_TOKEN")
    with pytest.raises(ConfigError, match="file not found"):
        load_settings()
    (tmp_path / "token").write_text("")
    settings = load_settings()  # an empty token file is caught when the provider opens it
    with pytest.raises(ConfigError, match="is empty"):
        provider_from_keys(settings.keys, settings.key_path)
