"""An in-process gateway app (real store on SQLite, no replicas) for the IAM tests, and helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from pydantic import SecretStr

from skyfleet.api.app import build_app
from skyfleet.config import Settings
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway

ADMIN_KEY = "sk-sf-" + "A" * 43
ROLES = ("platform-admin", "tenant-admin", "member", "read-only")


@dataclass
class RecordingAudit:
    """An Audit that keeps what it is told (the real sink is tested on its own)."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def record(self, action: str, *, actor: Principal | None, tenant_id: str | None = None,
               target: str | None = None, outcome: str = "ok", **detail: Any) -> None:
        self.entries.append({"action": action, "actor": actor, "tenant_id": tenant_id, "target": target,
                             "outcome": outcome, **detail})

    def key_used(self, principal: Principal) -> None:
        return None

    def actions(self) -> list[str]:
        return [e["action"] for e in self.entries]


@dataclass
class App:
    gw: Gateway
    asgi: Any
    audit: RecordingAudit
    #: role -> key of tenant "acme"; "globex-member" -> a key of tenant "globex".
    keys: dict[str, str]
    key_ids: dict[str, str]

    def http(self, client: tuple[str, int] = ("127.0.0.1", 50000)) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.asgi, client=client)
        return httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30)

    def sdk(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=api_key, max_retries=0,
                                  http_client=self.http())


@contextlib.asynccontextmanager
async def in_process_app(tmp_path: Path, **settings: Any) -> AsyncIterator[App]:
    """A real Gateway (SQLite, local key provider) with tenants acme and globex and a key per role."""
    merged: dict[str, Any] = {"data_dir": tmp_path / "data", "bootstrap": False, "admin_key": SecretStr(ADMIN_KEY),
                              "local": {"replicas": 0}, **settings}
    # Module-scoped users run before the autouse env scrub: keep an ambient SKYFLEET_* out by hand.
    ambient = {k: os.environ.pop(k) for k in list(os.environ)
               if k.startswith("SKYFLEET_") and not k.startswith("SKYFLEET_TEST_")}
    try:
        conf = Settings(**merged)
    finally:
        os.environ.update(ambient)
    gw = await Gateway.create(conf)
    audit = RecordingAudit()
    gw.audit = audit
    await gw.start()
    try:
        await gw.store.tenants.create("acme")
        await gw.store.tenants.create("globex")
        keys: dict[str, str] = {}
        ids: dict[str, str] = {}
        for role in ROLES:
            keys[role], rec = await gw.store.keys.create("acme", role=role, name=role)
            ids[role] = rec.id
        keys["globex-member"], rec = await gw.store.keys.create("globex", role="member")
        ids["globex-member"] = rec.id
        keys["bootstrap"] = ADMIN_KEY
        yield App(gw, build_app(gw, manage_lifecycle=False), audit, keys, ids)
    finally:
        await gw.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
