"""A real gateway (one llama.cpp replica) with three tenants, each holding conversations and responses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.harness import MODEL, Gateway, start_gateway, wait_until


@dataclass
class TenantData:
    name: str
    key: str
    canary: str
    conversations: list[str] = field(default_factory=list)
    items: list[tuple[str, str]] = field(default_factory=list)  # (conversation id, item id)
    responses: list[str] = field(default_factory=list)


@dataclass
class World:
    gw: Gateway
    tenants: list[TenantData]


def _tenant(gw: Gateway, name: str) -> TenantData:
    assert gw.admin("POST", "/admin/v1/tenants", json={"name": name}).status_code == 201
    r = gw.admin("POST", "/admin/v1/keys", json={"tenant": name, "role": "member"})
    assert r.status_code == 201, r.text
    t = TenantData(name=name, key=r.json()["key"], canary=f"CANARY-{name}-91f2e")
    client = gw.client(key=t.key)
    for i in range(2):
        conv = client.conversations.create(
            items=[{"type": "message", "role": "user", "content": f"{t.canary} secret {i}"}],
            metadata={"owner": t.canary})
        t.conversations.append(conv.id)
        t.items += [(conv.id, it.id) for it in client.conversations.items.list(conv.id).data]
        resp = client.responses.create(model=MODEL, input=f"Say {t.canary}", max_output_tokens=2)
        t.responses.append(resp.id)
    return t


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gw = start_gateway(tmp_path_factory.mktemp("sec"), replicas=1, local__threads="1")
    wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys")
    try:
        yield World(gw, [_tenant(gw, name) for name in ("acme", "globex", "initech")])
    finally:
        gw.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
