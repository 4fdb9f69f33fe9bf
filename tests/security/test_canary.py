"""Canary: a secret planted in prompts, keys and an engine's error message appears nowhere at rest or out.

Checked: the database (the SQLite files, or a PostgreSQL ``pg_dump``), the gateway's and replicas'
logs, ``/metrics``, and every error body the client got. The check is end to end through a real
gateway with a real llama.cpp replica; a sanity assertion proves each search could have matched.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import openai
import pytest
from sqlalchemy.engine import make_url

from tests.e2e.harness import MODEL, start_gateway, wait_until

CANARY = "CANARYq7v1zk"


def _pg_dump(url: str) -> bytes:
    u = make_url(url)
    return subprocess.run(["pg_dump", "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432), "-U",
                           u.username or "postgres", "--format=plain", u.database or ""],
                          capture_output=True, check=True, timeout=60).stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_canary_never_leaks(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    settings = {"local__threads": "1"}
    if backend == "postgresql":
        settings["database_url"] = request.getfixturevalue("pg_database_url")
    gw = start_gateway(tmp_path, replicas=1, **settings)
    error_bodies: list[str] = []
    try:
        wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys")
        created = gw.admin("POST", "/admin/v1/keys", json={"tenant": "default", "name": "canary-test"}).json()
        key = created["key"]
        client = gw.client(key=key)
        # Prompts: chat, a stored response and a conversation (item text and metadata).
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say {CANARY}"}],
                                       max_tokens=2)
        client.responses.create(model=MODEL, input=f"Remember {CANARY}", max_output_tokens=2)
        conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": CANARY}],
                                           metadata={"note": CANARY})
        # An engine error that quotes the request: llama.cpp echoes a bad JSON schema's type.
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": CANARY}}})
        error_bodies.append(bad.value.response.text)
        # Keys: a canary-bearing key that does not exist, and a bad one on every kind of route.
        with gw.http() as h:
            for path in ("/v1/models", "/v1/conversations/" + conv.id, "/admin/v1/tenants"):
                r = h.get(path, headers={"Authorization": f"Bearer sk-sf-{CANARY}{'x' * 31}"})
                assert r.status_code == 401
                error_bodies.append(r.text)
            metrics = h.get("/metrics", headers={"Authorization": f"Bearer {gw.admin_key}"}).text
    finally:
        assert gw.stop() == 0
    if backend == "postgresql":
        database = _pg_dump(settings["database_url"])
    else:
        database = b"".join(p.read_bytes() for p in gw.data_dir.glob("skyfleet.db*"))
    logs = gw.logs() + "".join(p.read_text(errors="replace") for p in gw.data_dir.rglob("*.log"))
    places = {"database": database, "logs": logs.encode(), "metrics": metrics.encode(),
              "error bodies": "\n".join(error_bodies).encode()}
    for where, data in places.items():
        for secret in (CANARY, key, gw.member_key, gw.admin_key):
            assert secret.encode() not in data, f"{secret[:12]}... found in {where}"
    # Each search could have matched: the database holds the key's hash, the logs the request ids,
    # the metrics the tenant label, and the engine's error did reach the client (as a 400).
    assert hashlib.sha256(key.encode()).hexdigest().encode() in database
    assert b"conversations" in database and b"default" in database
    assert b'tenant="default"' in places["metrics"]
    assert bad.value.status_code == 400 and "HTTP 400" in bad.value.message
