"""State that survives: SIGKILL of the gateway, kill -9 of the pinned replica; tenants isolated;
nothing tenant-private stored in plaintext."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.harness import MODEL, Gateway, start_gateway, wait_until


async def test_durability_gateway_sigkill_mid_run(tmp_path: Path) -> None:
    # One thread per replica: two 2-thread llama.cpp replicas on a 2-core machine oversubscribe
    # the cores and run several times slower under this much concurrency.
    gw = start_gateway(tmp_path, local__threads="1")
    try:
        await _talk_then_kill(gw)
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait(10)


async def _talk_then_kill(gw: Gateway) -> None:
    tmp_path = gw.data_dir.parent
    client = gw.async_client(timeout=60)
    convs = await asyncio.gather(*(client.conversations.create() for _ in range(100)))
    acked: dict[str, list[str]] = {c.id: [] for c in convs}
    enough = asyncio.Event()

    async def talk(conv_id: str, n: int) -> None:
        for turn in range(3):
            try:
                r = await client.responses.create(model=MODEL, input=f"conversation {n} turn {turn}: say hi",
                                                  conversation=conv_id, max_output_tokens=3)
            except (openai.APIConnectionError, openai.APIStatusError):
                return  # the gateway died under us: this turn was not acknowledged
            acked[conv_id].append(r.id)
            if sum(map(len, acked.values())) >= 120:
                enough.set()

    tasks = [asyncio.create_task(talk(c.id, i)) for i, c in enumerate(convs)]
    await asyncio.wait_for(enough.wait(), 120)
    gw.proc.send_signal(signal.SIGKILL)
    await asyncio.gather(*tasks)
    await client.close()
    gw.proc.wait(10)
    total = sum(map(len, acked.values()))
    assert total >= 120

    gw2 = start_gateway(tmp_path, local__threads="1")  # same data directory: same database and key file
    try:
        c2 = gw2.client(key=gw.member_key)
        for conv_id, response_ids in acked.items():
            for rid in response_ids:
                stored = c2.responses.retrieve(rid)
                assert stored.status in ("completed", "incomplete") and stored.output_text is not None
            items = c2.conversations.items.list(conv_id, order="asc", limit=100).data
            roles = [i.role for i in items]
            # Whole turns only: (user, assistant) pairs, never a user message without its answer.
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            assert len(roles) // 2 >= len(response_ids)
    finally:
        gw2.stop()


def test_next_turn_survives_kill_of_the_pinned_replica(fresh_gateway: Gateway) -> None:
    gw = fresh_gateway
    client = gw.client()
    before = {r["id"]: r["served"] for r in gw.replicas()}
    r1 = client.responses.create(model=MODEL, input="My favourite colour is teal. Say OK.", max_output_tokens=4)
    after = {r["id"]: r for r in gw.replicas()}
    pinned = [rid for rid, r in after.items() if r["served"] > before[rid]]
    assert len(pinned) == 1
    r2 = client.responses.create(model=MODEL, input="Say one word.", previous_response_id=r1.id,
                                 max_output_tokens=4)
    assert {r["id"]: r["served"] for r in gw.replicas()}[pinned[0]] == after[pinned[0]]["served"] + 1  # affinity
    os.kill(after[pinned[0]]["pid"], signal.SIGKILL)
    wait_until(lambda: {r["id"]: r for r in gw.replicas()}[pinned[0]]["state"] != "ready", 5, 0.02, "victim out")
    r3 = client.responses.create(model=MODEL, input="What is my favourite colour?", previous_response_id=r2.id,
                                 max_output_tokens=6)
    assert r3.status in ("completed", "incomplete")
    assert r3.usage.input_tokens > r2.usage.input_tokens  # the full history came along
    items = json.dumps([i.model_dump() for i in client.responses.input_items.list(r1.id).data])
    assert "teal" in items


def _status_and_message(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["message"]


def test_tenant_b_cannot_touch_tenant_a_state(gateway: Gateway) -> None:
    a = gateway.client()
    b_tenant = json.loads(gateway.cli("tenants", "create", "tenant-b", "--json").stdout)["name"]
    b_key = json.loads(gateway.cli("keys", "create", "--tenant", b_tenant, "--json").stdout)["key"]
    resp = a.responses.create(model=MODEL, input="A's private note", max_output_tokens=2)
    conv = a.conversations.create(items=[{"type": "message", "role": "user", "content": "A's secret"}])
    item = a.conversations.items.list(conv.id).data[0]
    hb = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {b_key}"}, timeout=30)
    chat = {"model": MODEL, "input": "continue", "max_output_tokens": 2}
    calls = [
        ("GET", "/v1/responses/{r}", None),
        ("DELETE", "/v1/responses/{r}", None),
        ("GET", "/v1/responses/{r}/input_items", None),
        ("POST", "/v1/responses", {**chat, "previous_response_id": "{r}"}),
        ("POST", "/v1/responses", {**chat, "conversation": "{c}"}),
        ("GET", "/v1/conversations/{c}", None),
        ("POST", "/v1/conversations/{c}", {"metadata": {"x": "y"}}),
        ("DELETE", "/v1/conversations/{c}", None),
        ("GET", "/v1/conversations/{c}/items", None),
        ("POST", "/v1/conversations/{c}/items", {"items": [{"role": "user", "content": "x"}]}),
        ("GET", "/v1/conversations/{c}/items/{i}", None),
        ("DELETE", "/v1/conversations/{c}/items/{i}", None),
    ]

    def call(method: str, path: str, body: dict | None, r: str, c: str, i: str) -> httpx.Response:
        fill = lambda s: s.replace("{r}", r).replace("{c}", c).replace("{i}", i)  # noqa: E731
        payload = json.loads(fill(json.dumps(body))) if body else None
        return hb.request(method, fill(path), json=payload)

    for method, path, body in calls:
        foreign = call(method, path, body, resp.id, conv.id, item.id)
        unknown = call(method, path, body, "resp_" + "0" * 24, "conv_" + "0" * 24, "msg_" + "0" * 24)
        assert foreign.status_code == 404, (method, path, foreign.text)
        # Indistinguishable from an id that does not exist.
        assert _status_and_message(foreign)[1].replace(resp.id, "").replace(conv.id, "").replace(item.id, "") == \
            _status_and_message(unknown)[1].replace("resp_" + "0" * 24, "").replace(
                "conv_" + "0" * 24, "").replace("msg_" + "0" * 24, "")
    # And A still has everything.
    assert a.responses.retrieve(resp.id).id == resp.id
    assert [i.id for i in a.conversations.items.list(conv.id).data] == [item.id]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_no_plaintext_conversation_at_rest(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    settings = {}
    if backend == "postgresql":
        settings["database_url"] = request.getfixturevalue("pg_database_url")
    gw = start_gateway(tmp_path, replicas=1, **settings)
    canary = "CANARY-c0nv3rsation-9d1e"
    try:
        client = gw.client()
        conv = client.conversations.create(metadata={"note": canary},
                                           items=[{"type": "message", "role": "user", "content": canary}])
        r = client.responses.create(model=MODEL, input=f"Repeat exactly: {canary}", conversation=conv.id,
                                    instructions=f"System note {canary}", max_output_tokens=16)
        assert canary in json.dumps(client.responses.input_items.list(r.id).model_dump())  # readable via the API
    finally:
        assert gw.stop() == 0
    if backend == "sqlite":
        blobs = b"".join(p.read_bytes() for p in gw.data_dir.glob("skyfleet.db*"))
        assert len(blobs) > 10_000
    else:
        url = settings["database_url"].replace("postgresql+asyncpg://", "postgresql://")
        blobs = subprocess.run(["pg_dump", url], capture_output=True, check=True, timeout=60).stdout
        assert b"CREATE TABLE" in blobs
    assert canary.encode() not in blobs
    assert b"System note" not in blobs
