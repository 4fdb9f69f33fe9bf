"""The gateway and the CLI build the key provider that `keys.provider` names."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyfleet.config import load_settings
from skyfleet.crypto import LocalKeyProvider, open_key_provider
from skyfleet.crypto.providers.aws_kms import AwsKmsProvider
from skyfleet.crypto.providers.vault_transit import VaultTransitProvider
from skyfleet.runtime import Gateway
from tests.crypto.kms_fake import REGION, fake_credentials
from tests.fakes.vault_transit import FakeVaultTransit


def test_open_key_provider_follows_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFLEET_DATA_DIR", str(tmp_path))
    local = open_key_provider(load_settings())
    assert isinstance(local, LocalKeyProvider) and local.path == tmp_path.absolute() / "keys" / "master.key"
    fake_credentials(monkeypatch)
    monkeypatch.setenv("SKYFLEET_KEYS__PROVIDER", "aws-kms")
    monkeypatch.setenv("SKYFLEET_KEYS__KMS_REGION", REGION)
    monkeypatch.setenv("SKYFLEET_KEYS__KMS_ALIAS_PREFIX", "alias/prod/skyfleet")
    kms = open_key_provider(load_settings())
    assert isinstance(kms, AwsKmsProvider) and kms.alias("ten_a") == "alias/prod/skyfleet/ten_a"


async def test_the_gateway_keeps_tenant_keys_in_vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeVaultTransit(token="hvs.gateway") as vault:
        for name, value in {"DATA_DIR": str(tmp_path), "LOCAL__REPLICAS": "0", "KEYS__PROVIDER": "vault-transit",
                            "KEYS__VAULT_URL": vault.url, "KEYS__VAULT_TOKEN": "hvs.gateway"}.items():
            monkeypatch.setenv(f"SKYFLEET_{name}", value)
        gw = await Gateway.create(load_settings())
        try:
            assert isinstance(gw.store.keyring.provider, VaultTransitProvider)
            tenant = await gw.store.tenants.create("acme")
            conv = await gw.store.conversations.create(tenant.id, metadata={"k": "v"})
            assert (await gw.store.conversations.get(tenant.id, conv.id)).metadata == {"k": "v"}
            assert vault.key(f"skyfleet-{tenant.id}") is not None
            assert not (tmp_path / "keys" / "master.key").exists()  # no local KEK material
        finally:
            await gw.stop()
