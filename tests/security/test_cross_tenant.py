"""Cross-tenant fuzz: random keys against other tenants' ids on every id-taking route; 0 leaks.

A foreign id must be indistinguishable from an id that never existed (same status, same body
apart from the id), must not reveal the owner's data, and must not change it.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import httpx

from tests.security.conftest import World

N_REQUESTS = 3000

# Every route that takes a tenant-owned id: (method, path template, body).
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/conversations/{cid}", None),
    ("POST", "/v1/conversations/{cid}", {"metadata": {"k": "v"}}),
    ("DELETE", "/v1/conversations/{cid}", None),
    ("GET", "/v1/conversations/{cid}/items", None),
    ("POST", "/v1/conversations/{cid}/items", {"items": [{"type": "message", "role": "user", "content": "x"}]}),
    ("GET", "/v1/conversations/{cid}/items/{item_id}", None),
    ("DELETE", "/v1/conversations/{cid}/items/{item_id}", None),
    ("GET", "/v1/responses/{response_id}", None),
    ("DELETE", "/v1/responses/{response_id}", None),
    ("GET", "/v1/responses/{response_id}/input_items", None),
    ("POST", "/v1/responses", {"model": "smollm2-135m-instruct", "input": "hi", "previous_response_id": "{response_id}",
                               "max_output_tokens": 1}),
    ("POST", "/v1/responses", {"model": "smollm2-135m-instruct", "input": "hi", "conversation": "{cid}",
                               "max_output_tokens": 1}),
]


def _fill(template: Any, ids: dict[str, str]) -> Any:
    if isinstance(template, str):
        return re.sub(r"{(\w+)}", lambda m: ids[m.group(1)], template)
    if isinstance(template, dict):
        return {k: _fill(v, ids) for k, v in template.items()}
    return template


def _normalise(body: str, ids: dict[str, str]) -> str:
    for value in ids.values():
        body = body.replace(value, "<ID>")
    return body


async def _fuzz(world: World, rng: random.Random) -> list[str]:
    problems: list[str] = []
    sem = asyncio.Semaphore(16)
    canaries = {t.name: t.canary for t in world.tenants}
    async with httpx.AsyncClient(base_url=world.gw.url, timeout=60) as h:

        async def one(i: int) -> None:
            caller, owner = rng.sample(world.tenants, 2)
            method, path, body = rng.choice(ROUTES)
            cid, item_id = rng.choice(owner.items)
            foreign = {"cid": cid, "item_id": item_id, "response_id": rng.choice(owner.responses)}
            # The same request with ids that never existed, for the indistinguishability check.
            ghost = {"cid": "conv_" + "z" * 16, "item_id": "msg_" + "z" * 16, "response_id": "resp_" + "z" * 16}
            headers = {"Authorization": f"Bearer {caller.key}"}
            async with sem:
                real = await h.request(method, _fill(path, foreign), json=_fill(body, foreign), headers=headers)
                fake = await h.request(method, _fill(path, ghost), json=_fill(body, ghost), headers=headers)
            text = real.text
            if real.status_code != 404:
                problems.append(f"{method} {path} as {caller.name} on {owner.name}'s id: {real.status_code}")
            if (real.status_code, _normalise(text, foreign)) != (fake.status_code, _normalise(fake.text, ghost)):
                problems.append(f"{method} {path}: foreign id distinguishable from a missing one: {text[:200]}")
            for name, canary in canaries.items():
                if name != caller.name and canary in text:
                    problems.append(f"{method} {path}: {name}'s data leaked to {caller.name}")

        await asyncio.gather(*(one(i) for i in range(N_REQUESTS // 2)))
    return problems


async def test_cross_tenant_fuzz_leaks_nothing(world: World) -> None:
    problems = await _fuzz(world, random.Random(20261124))
    assert problems == [], "\n".join(problems[:20])
    # Nothing was changed or deleted through a foreign key: every owner still sees all its data.
    for t in world.tenants:
        client = world.gw.client(key=t.key)
        for cid in t.conversations:
            conv = client.conversations.retrieve(cid)
            assert conv.metadata == {"owner": t.canary}
            items = client.conversations.items.list(cid).data
            assert [it.id for it in items] == [i for c, i in t.items if c == cid]
            assert t.canary in items[0].content[0].text
        for rid in t.responses:
            assert client.responses.retrieve(rid).id == rid
