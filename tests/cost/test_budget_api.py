"""Budgets through a real in-process gateway (SQLite store, simulated engine, the openai SDK): the admin
API and its object-level rules, bad input, the 429 on every inference route, a lowered budget on the
next request, the soft-limit webhook; and the `skyfleet budgets` CLI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from typer.testing import CliRunner

from skyfleet.cli.app import app as cli
from skyfleet.engines.sim import SimProfile
from skyfleet.engines.sim import build_app as sim_app
from tests.threaded_server import serve_in_thread
from tests.unit.iam_app import App, bearer, in_process_app

MODEL = "m"


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with serve_in_thread(sim_app(SimProfile(), model="sim-model", fast=True)) as url:
        yield url


class Hook:
    """A webhook receiver (aiohttp on a free port) that keeps what it is sent."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.raw.append(body)
            self.got.append(json.loads(body))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/alerts", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}/alerts"


@pytest.fixture(scope="module")
async def stack(sim_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[App, Hook]]:
    hook = Hook()
    url = await hook.start()
    static = [{"url": sim_url, "model": MODEL, "upstream_model": "sim-model", "engine": "sim",
               "context_window": 4096, "usd_per_hour": 3.6}]
    # 3.6 $/h at 1000 weighted tokens/s: one micro-dollar per weighted token (prompt 0.25, completion 1).
    async with in_process_app(tmp_path_factory.mktemp("budgets"), static_replicas=static,
                              cost={"default_nominal_tokens_per_s": 1000.0},
                              budgets={"webhook_url": url, "webhook_retries": 0}) as built:
        assert await built.gw.wait_ready(10)
        yield built, hook
    assert hook.runner is not None
    await hook.runner.cleanup()


async def settled(app: App) -> None:
    """Wait (polling) until the gate has applied every queued settlement."""
    deadline = time.monotonic() + 10
    while app.gw.budgets.pending:
        assert time.monotonic() < deadline, "settlements were never applied"
        await asyncio.sleep(0.01)
    await app.gw.budgets.flush()


async def test_platform_and_tenant_admin_rules(stack: tuple[App, Hook]) -> None:
    app, _ = stack
    pa, ta, member = (bearer(app.keys[r]) for r in ("platform-admin", "tenant-admin", "member"))
    async with app.http() as h:
        r = await h.post("/admin/v1/budgets", json={"tenant": "acme", "period": "monthly", "soft_limit_usd": "50",
                                                    "hard_limit_usd": 100.25}, headers=pa)
        assert r.status_code == 201, r.text
        tenant_budget = r.json()
        assert (tenant_budget["scope"], tenant_budget["tenant"], tenant_budget["key_id"]) == ("tenant", "acme", None)
        assert (tenant_budget["hard_limit_usd"], tenant_budget["hard_limit_usd_micros"]) == ("100.25", 100_250_000)
        assert tenant_budget["current"]["spent_usd_micros"] == 0 and tenant_budget["current"]["resets_at"] > 0
        assert (await h.post("/admin/v1/budgets", json={"tenant": "acme", "period": "monthly", "hard_limit_usd": 1},
                             headers=pa)).status_code == 409
        # A tenant-admin never sets (or changes, or deletes) its own tenant's budget: mass assignment.
        r = await h.post("/admin/v1/budgets", json={"tenant": "acme", "period": "daily", "hard_limit_usd": 10**6},
                         headers=ta)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        for call in (h.patch(f"/admin/v1/budgets/{tenant_budget['id']}", json={"hard_limit_usd": None}, headers=ta),
                     h.delete(f"/admin/v1/budgets/{tenant_budget['id']}", headers=ta)):
            assert (await call).status_code == 403
        # ... but does set its own tenant's keys' budgets, up to its own role.
        r = await h.post("/admin/v1/budgets", json={"key_id": app.key_ids["member"], "period": "daily",
                                                    "hard_limit_usd": "2.5"}, headers=ta)
        assert r.status_code == 201 and r.json()["scope"] == "key", r.text
        key_budget = r.json()
        r = await h.post("/admin/v1/budgets", json={"key_id": app.key_ids["platform-admin"], "period": "daily",
                                                    "hard_limit_usd": "1"}, headers=ta)
        assert r.status_code == 403
        # Another tenant's key and budget do not exist for it.
        r = await h.post("/admin/v1/budgets", json={"key_id": app.key_ids["globex-member"], "period": "daily",
                                                    "hard_limit_usd": "1"}, headers=ta)
        assert r.status_code == 404
        r = await h.post("/admin/v1/budgets", json={"tenant": "globex", "period": "total", "soft_limit_usd": "1"},
                         headers=pa)
        globex = r.json()
        assert r.status_code == 201
        for call in (h.patch(f"/admin/v1/budgets/{globex['id']}", json={"soft_limit_usd": "9"}, headers=ta),
                     h.delete(f"/admin/v1/budgets/{globex['id']}", headers=ta)):
            assert (await call).status_code == 404
        listed = (await h.get("/admin/v1/budgets", headers=ta)).json()["data"]
        assert {b["id"] for b in listed} == {tenant_budget["id"], key_budget["id"]}
        assert (await h.get("/admin/v1/budgets", params={"tenant": "globex"}, headers=ta)).status_code == 403
        assert [b["id"] for b in (await h.get("/admin/v1/budgets", params={"tenant": "globex"},
                                               headers=pa)).json()["data"]] == [globex["id"]]
        assert (await h.get("/admin/v1/budgets", params={"tenant": "nope"}, headers=pa)).status_code == 404
        r = await h.patch(f"/admin/v1/budgets/{key_budget['id']}", json={"soft_limit_usd": "1"}, headers=ta)
        assert r.status_code == 200 and r.json()["soft_limit_usd"] == "1.00" and r.json()["hard_limit_usd"] == "2.50"
        for method, path in (("GET", "/admin/v1/budgets"), ("POST", "/admin/v1/budgets"),
                             ("PATCH", f"/admin/v1/budgets/{key_budget['id']}"),
                             ("DELETE", f"/admin/v1/budgets/{key_budget['id']}")):
            r = await h.request(method, path, json={} if method in ("POST", "PATCH") else None, headers=member)
            assert r.status_code == 403, (method, path)
        assert (await h.delete(f"/admin/v1/budgets/{key_budget['id']}", headers=ta)).json()["deleted"] is True
        for b in (tenant_budget, globex):
            assert (await h.delete(f"/admin/v1/budgets/{b['id']}", headers=pa)).status_code == 200
        assert (await h.get("/admin/v1/budgets", headers=pa)).json()["data"] == []
    actions = app.audit.actions()
    assert actions.count("budget.create") == 3 and actions.count("budget.delete") == 3
    assert "budget.update" in actions


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": -1}, "hard_limit_usd", "negative"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": "-0.01"}, "hard_limit_usd", "negative"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": "NaN"}, "hard_limit_usd", "finite"),
    ({"tenant": "acme", "period": "daily", "soft_limit_usd": "Infinity"}, "soft_limit_usd", "finite"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": "ten"}, "hard_limit_usd", "amount in dollars"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": True}, "hard_limit_usd", "amount in dollars"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": [1]}, "hard_limit_usd", "amount in dollars"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": "0.0000001"}, "hard_limit_usd", "6 decimals"),
    ({"tenant": "acme", "period": "weekly", "hard_limit_usd": 1}, "period", "'daily', 'monthly' or 'total'"),
    ({"tenant": "acme", "hard_limit_usd": 1}, "period", "required"),
    ({"tenant": "acme", "period": "daily"}, "hard_limit_usd", "soft limit, a hard limit, or both"),
    ({"tenant": "acme", "period": "daily", "soft_limit_usd": 5, "hard_limit_usd": 4}, "soft_limit_usd", "above"),
    ({"period": "daily", "hard_limit_usd": 1}, "tenant", "Give 'tenant'"),
    ({"tenant": "acme", "tenant_id": "ten_x", "period": "daily", "hard_limit_usd": 1}, "tenant_id", "Extra inputs"),
    ({"tenant": "acme", "period": "daily", "hard_limit_usd": 1, "spent_usd_micros": 0}, "spent_usd_micros",
     "Extra inputs"),
])
async def test_bad_input_is_a_400_that_says_what_is_wrong(stack: tuple[App, Hook], body: dict[str, Any],
                                                          param: str, says: str) -> None:
    app, _ = stack
    async with app.http() as h:
        r = await h.post("/admin/v1/budgets", json=body, headers=bearer(app.keys["platform-admin"]))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


async def test_bad_patch_and_raw_nan(stack: tuple[App, Hook]) -> None:
    app, _ = stack
    pa = bearer(app.keys["platform-admin"])
    async with app.http() as h:
        made = (await h.post("/admin/v1/budgets", json={"tenant": "globex", "period": "daily", "hard_limit_usd": 1},
                             headers=pa)).json()
        try:
            for body, says in (({"period": "monthly"}, "Extra inputs"), ({"hard_limit_usd": None}, "or both"),
                               ({"hard_limit_usd": "-3"}, "negative")):
                r = await h.patch(f"/admin/v1/budgets/{made['id']}", json=body, headers=pa)
                assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
            r = await h.post("/admin/v1/budgets", content=b'{"tenant": "acme", "period": "daily", "hard_limit_usd": NaN}',
                             headers={**pa, "Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
            assert (await h.patch("/admin/v1/budgets/bud_nope", json={}, headers=pa)).status_code == 404
        finally:
            await h.delete(f"/admin/v1/budgets/{made['id']}", headers=pa)


async def test_hard_limit_refuses_every_route_and_a_lowered_limit_applies_to_the_next_request(
        stack: tuple[App, Hook]) -> None:
    app, hook = stack
    gw = app.gw
    await gw.store.tenants.create("spender")
    key, rec = await gw.store.keys.create("spender", role="member")
    sdk = app.sdk(key)
    pa = bearer(app.keys["platform-admin"])
    async with app.http() as h:
        r = await h.post("/admin/v1/budgets", json={"key_id": rec.id, "period": "daily", "soft_limit_usd": "0.00001",
                                                    "hard_limit_usd": "1"}, headers=pa)
        budget = r.json()
        assert r.status_code == 201, r.text
        done = await sdk.completions.create(model=MODEL, prompt="Hello there", max_tokens=5)
        stream = await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=5, stream=True)
        assert [c async for c in stream]
        resp = await sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=5, store=False)
        assert resp.status in ("completed", "incomplete")
        await settled(app)
        current = (await h.get("/admin/v1/budgets", params={"tenant": "spender"}, headers=pa)).json()["data"][0]
        spent = current["current"]["spent_usd_micros"]
        u = done.usage
        assert u is not None and spent >= -(-(u.prompt_tokens * 250_000 + u.completion_tokens * 1_000_000)
                                            // 1_000_000)
        assert current["current"]["reserved_usd_micros"] == 0 and spent > 0
        # Lowered below what is spent: the very next request (every route) is refused.
        assert spent > 10
        r = await h.patch(f"/admin/v1/budgets/{budget['id']}", json={"hard_limit_usd": "0.00001"}, headers=pa)
        assert r.status_code == 200, r.text
        for call in (lambda: sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=1),
                     lambda: sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=1, stream=True),
                     lambda: sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=16)):
            with pytest.raises(openai.RateLimitError) as caught:
                await call()
            err = caught.value
            assert (err.code, err.type) == ("budget_exceeded", "insufficient_quota")
            assert f"API key's daily budget ({budget['id']})" in err.message and "resets at" in err.message
            assert err.response.headers["x-should-retry"] == "false"
            assert int(err.response.headers["retry-after"]) <= 86_400
        assert gw.metrics.registry.get_sample_value(
            "skyfleet_budget_refused_requests_total", {"scope": "key", "period": "daily"}) >= 3
        # Nothing was reserved by the refused requests; raising the limit lets the next one through.
        await h.patch(f"/admin/v1/budgets/{budget['id']}", json={"hard_limit_usd": "1"}, headers=pa)
        assert (await sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=1)).choices
        await settled(app)
        # The soft limit ($0.00001) was crossed once: one webhook POST, ids and amounts, no key or text.
        deadline = time.monotonic() + 10
        while not hook.got:
            assert time.monotonic() < deadline, "no webhook"
            await asyncio.sleep(0.01)
        await gw.budgets.alerts.wait_idle(5)
        mine = [g for g in hook.got if g["budget_id"] == budget["id"]]
        assert len(mine) == 1 and mine[0]["key_id"] == rec.id and mine[0]["type"] == "budget.soft_limit_reached"
        assert all(key.encode() not in raw and b"Hello there" not in raw for raw in hook.raw)


def test_cli_create_list_update_delete_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYFLEET_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    assert runner.invoke(cli, ["tenants", "create", "acme"]).exit_code == 0
    r = runner.invoke(cli, ["budgets", "create", "--tenant", "acme", "--period", "daily", "--hard", "12.5",
                            "--soft", "10", "--json"])
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)[0]
    assert (made["hard_limit_usd"], made["soft_limit_usd_micros"], made["period"]) == ("12.50", 10_000_000, "daily")
    r = runner.invoke(cli, ["budgets", "list", "--json"])
    assert [b["id"] for b in json.loads(r.stdout)] == [made["id"]]
    assert made["id"] in runner.invoke(cli, ["budgets", "list"], env={"COLUMNS": "250"}).stdout
    r = runner.invoke(cli, ["budgets", "update", made["id"], "--no-soft", "--hard", "3"])
    assert r.exit_code == 0 and "updated" in r.stdout, r.output
    listed = json.loads(runner.invoke(cli, ["budgets", "list", "--tenant", "acme", "--json"]).stdout)[0]
    assert (listed["soft_limit_usd"], listed["hard_limit_usd"]) == (None, "3.00")
    for args, says in ((["--hard", "-1"], "negative"), (["--hard", "NaN"], "finite"), (["--hard", "abc"], "dollars"),
                       (["--period", "weekly", "--hard", "1"], "unknown period"), (["--hard", "1.0000001"], "decimals")):
        r = runner.invoke(cli, ["budgets", "create", "--tenant", "acme", *args])
        assert r.exit_code == 2 and says in r.output, (args, r.output)
    r = runner.invoke(cli, ["budgets", "create", "--tenant", "acme", "--period", "daily", "--hard", "1"])
    assert r.exit_code == 1 and "already has a budget" in r.output
    r = runner.invoke(cli, ["budgets", "create", "--tenant", "nope", "--hard", "1"])
    assert r.exit_code == 1 and "not found" in r.output
    r = runner.invoke(cli, ["budgets", "update", made["id"], "--no-hard"])
    assert r.exit_code == 1 and "or both" in r.output
    assert runner.invoke(cli, ["budgets", "delete", made["id"]]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["budgets", "list", "--json"]).stdout) == []
    audit = runner.invoke(cli, ["audit", "list", "--json"])
    assert audit.exit_code == 0 and "budget.create" in audit.stdout and "budget.delete" in audit.stdout
