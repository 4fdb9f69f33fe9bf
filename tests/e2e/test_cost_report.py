"""The embedded default, end to end: after a few requests from two tenants, `skyfleet cost report` (a CLI
process on the same data dir) and GET /admin/v1/costs show non-zero per-tenant costs and idle cost,
with attributed + idle = total replica cost; /admin/v1/usage lists the requests, never their text."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.harness import MODEL, start_gateway, wait_until

CANARY = "CANARY-cost-7c1f"


def test_cost_report_shows_tenants_and_idle(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, replicas=2, local__threads="1")
    try:
        wait_until(lambda: "API key" in gw.keys, 10, what="bootstrap keys")
        gw.cli("tenants", "create", "beta", "--json")
        beta_key = json.loads(gw.cli("keys", "create", "--tenant", "beta", "--json").stdout)["key"]
        for client in (gw.client(), gw.client(key=beta_key)):
            for i in range(2):
                client.chat.completions.create(model=MODEL, max_tokens=4,
                                               messages=[{"role": "user", "content": f"{CANARY} {i}"}])

        def usage() -> list[dict]:
            r = gw.admin("GET", "/admin/v1/usage", params={"since": "1h"})
            assert r.status_code == 200, r.text
            return list(r.json()["data"])

        wait_until(lambda: len(usage()) >= 4, 30, 0.2, "usage records written")  # batched: flushed within ~1 s
        records = usage()
        assert {r["tenant"] for r in records} == {"default", "beta"}
        assert all(r["status"] == "completed" and r["completion_tokens"] > 0 and r["charged_usd_micros"] > 0
                   for r in records)
        assert CANARY not in json.dumps(records)

        out = gw.cli("cost", "report", "--by", "tenant", "--since", "1h", "--format", "json")
        body = json.loads(out.stdout)
        rows = {r["name"]: r for r in body["rows"]}
        assert set(rows) == {"default", "beta"}, body
        for name in ("default", "beta"):
            assert rows[name]["requests"] == 2
            assert rows[name]["attributed_usd"] > 0 and rows[name]["charged_usd"] > 0
        totals = body["totals"]
        assert totals["idle_usd"] > 0 and totals["replica_cost_usd"] > 0
        assert totals["conserved"] is True, totals
        assert len(body["idle"]["replicas"]) == 2 and all(r["cost_usd"] > 0 for r in body["idle"]["replicas"])

        table = gw.cli("cost", "report", "--by", "tenant", "--since", "1h").stdout
        assert "Cost by tenant" in table and "beta" in table and "check: attributed" in table and "OK" in table

        r = gw.admin("GET", "/admin/v1/costs", params={"by": "tenant", "since": "1h"})
        assert r.status_code == 200, r.text
        assert {row["name"] for row in r.json()["rows"]} == {"default", "beta"}
        assert r.json()["totals"]["idle_usd"] > 0
    finally:
        assert gw.stop() == 0
