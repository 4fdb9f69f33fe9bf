"""`skyfleet keys rotate-dek` and `rotate-kek` end to end through the CLI (SQLite, local key file)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skyfleet.cli.app import app
from skyfleet.config import load_settings
from skyfleet.crypto import LocalKeyProvider
from skyfleet.crypto.providers.local import parse_key_file
from skyfleet.state import Store

from .rotation_helpers import dek_versions, message


def test_rotate_dek_then_kek_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFLEET_DATA_DIR", str(tmp_path))
    settings = load_settings()

    async def open_store() -> Store:
        provider = LocalKeyProvider.open(settings.key_path)
        return await Store.open(settings.database_url_value, key_provider=provider)

    async def setup() -> tuple[str, str]:
        store = await open_store()
        try:
            tenant = await store.tenants.create("acme")
            conv = await store.conversations.create(tenant.id, metadata={"k": "v"}, items=[message("secret text")])
            return tenant.id, conv.id
        finally:
            await store.close()

    tenant_id, conv_id = asyncio.run(setup())
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "rotate-dek", "--tenant", "acme", "--retire-old", "--settle-s", "0",
                                 "--batch-size", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["target_version"], report["reencrypted"], report["remaining"], report["retired"]) == (2, 2, 0, [1])

    result = runner.invoke(app, ["keys", "rotate-kek", "--retire-old", "--settle-s", "0"])
    assert result.exit_code == 0, result.output
    assert "local: 1 data keys of 1 tenants rewrapped" in result.stdout and "retired" in result.stdout
    assert parse_key_file(settings.key_path.read_bytes()).keys() == {2}

    result = runner.invoke(app, ["keys", "rotate-dek", "--tenant", "nobody"])
    assert result.exit_code == 1 and "not found" in result.output

    async def check() -> None:
        store = await open_store()
        try:
            assert await dek_versions(store, tenant_id) == {2: 2}
            assert (await store.conversations.get(tenant_id, conv_id)).metadata == {"k": "v"}
            [item] = await store.conversations.all_items(tenant_id, conv_id)
            assert item.item["content"][0]["text"] == "secret text"
        finally:
            await store.close()

    asyncio.run(check())


def test_a_misconfigured_provider_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SKYFLEET_KEYS__PROVIDER", "vault-transit")
    result = CliRunner().invoke(app, ["keys", "rotate-kek"])
    assert result.exit_code == 2
    assert "keys.vault_url is required when keys.provider is 'vault-transit'" in result.output
