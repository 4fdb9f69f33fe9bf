"""The audit log of a real `skyfleet serve`: requests and CLI changes are recorded, the last batch is
written on SIGTERM, and `skyfleet audit verify` proves the chain; no key or prompt is in it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.e2e.harness import MODEL, start_gateway, wait_until

CANARY = "CANARY-audit-5d1e"


def test_serve_records_and_verifies(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, replicas=1, local__threads="1")
    try:
        wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys")
        created = json.loads(gw.cli("keys", "create", "--tenant", "default", "--json").stdout)
        client = gw.client(key=created["key"])
        for _ in range(2):
            client.chat.completions.create(model=MODEL, max_tokens=2,
                                           messages=[{"role": "user", "content": f"Say {CANARY}"}])
        conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": CANARY}])
        client.conversations.delete(conv.id)
        listed = gw.admin("GET", "/admin/v1/audit", params={"action": "conversation.delete"})
        assert listed.status_code == 200
    finally:
        assert gw.stop() == 0  # SIGTERM: the gateway writes its last batch and key-use window, then exits
    verified = gw.cli("audit", "verify")
    assert verified.stdout.startswith("audit log OK: "), verified.stdout + verified.stderr
    entries = json.loads(gw.cli("audit", "list", "--json", "--limit", "100").stdout)
    by_action: dict[str, list[dict]] = {}
    for e in entries:
        by_action.setdefault(e["action"], []).append(e)
    assert [e["actor"] for e in by_action["key.create"]] == ["cli"]
    assert by_action["key.create"][0]["target"] == created["id"]
    assert by_action["conversation.delete"][0]["target"] == conv.id
    uses = {e["actor"]: e["detail"]["count"] for e in by_action["key.use"]}
    assert uses[created["id"]] == 4  # two chats, the create and the delete, in one entry
    with sqlite3.connect(gw.data_dir / "skyfleet.db") as db:
        rows = repr(db.execute("SELECT * FROM audit_log").fetchall())
    assert created["id"] in rows  # the search could match
    for secret in (created["key"], gw.admin_key, gw.member_key, CANARY):
        assert secret not in rows
