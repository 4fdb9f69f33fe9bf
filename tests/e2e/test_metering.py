"""Metering on a real gateway (`skyfleet serve`, the embedded default: 2 llama.cpp replicas), the
openai SDK as the client, the gateway's own SQLite store read back.

* A client that leaves a stream after N tokens is billed for what was generated: exactly one usage
  record for the request id, status ``cancelled``, about N completion tokens.
* A few requests give usage rows with a charged cost; both replicas have a cost interval, open
  while the gateway runs and closed when it stops; a request just before SIGTERM is still metered
  (the shutdown flush); attributing the window gives a non-zero cost to the tenant and idle cost.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from skyfleet.cost.attribution import IntervalCost, UsageSlice, attribute
from skyfleet.cost.pricing import TokenWeights
from tests.e2e.harness import MODEL, Gateway, gateway_env, start_gateway, wait_until

pytestmark = pytest.mark.e2e

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("metering"), replicas=2, local__threads="1")
    wait_until(lambda: "API key" in gateway.keys, 10, what="bootstrap keys on stdout")
    yield gateway
    gateway.stop(timeout_s=60)


def query(gw: Gateway, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{gw.data_dir / 'skyfleet.db'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def usage(gw: Gateway, request_id: str) -> list[sqlite3.Row]:
    return query(gw, "SELECT * FROM usage_records WHERE request_id = ?", request_id)


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def test_a_client_leaving_mid_stream_is_billed_for_the_tokens_generated(gw: Gateway) -> None:
    n = 12
    raw = gw.client().chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT, max_tokens=400,
                                                                 temperature=0, stream=True)
    request_id = raw.headers["x-request-id"]
    stream = raw.parse()
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == n:
                break
    stream.close()  # the client goes away after n tokens
    wait_until(lambda: len(usage(gw, request_id)) == 1, 30, what="the cancelled request's usage record")
    (record,) = usage(gw, request_id)
    assert record["status"] == "cancelled"
    assert abs(record["completion_tokens"] - n) <= 2, record["completion_tokens"]
    assert record["prompt_tokens"] > 0 and record["charged_usd_micros"] > 0  # the prompt was prefilled too
    assert record["replica_id"] in ("local-0", "local-1") and record["pool"] == "local"


def test_usage_intervals_and_attribution_with_the_embedded_default(gw: Gateway) -> None:
    client = gw.client()
    ids = []
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say hello number {i}."}], max_tokens=16)
        ids.append(raw.headers["x-request-id"])
        assert raw.parse().usage.completion_tokens > 0
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                                      stream=True)
    ids.append(raw.headers["x-request-id"])
    assert "".join(c.choices[0].text for c in raw.parse() if c.choices)
    wait_until(lambda: all(len(usage(gw, r)) == 1 for r in ids), 30, what="usage records")
    rows = [usage(gw, r)[0] for r in ids]
    assert all(r["status"] == "completed" and r["charged_usd_micros"] > 0 and r["completion_tokens"] > 0
               for r in rows)
    assert len({r["tenant_id"] for r in rows}) == 1

    intervals = query(gw, "SELECT * FROM replica_intervals ORDER BY replica_id")
    assert [(i["replica_id"], i["tier"], i["usd_per_hour"], i["ended_at"]) for i in intervals] == [
        ("local-0", "local", 0.085, None), ("local-1", "local", 0.085, None)]
    assert len({i["owner"] for i in intervals}) == 1
    assert gw.metric("skyfleet_cost_usd_total") > 0
    assert gw.metric("skyfleet_pool_cost_usd_per_hour", pool="local") == pytest.approx(0.17)

    # One more request, then SIGTERM at once: the shutdown flush writes it; the intervals close.
    last = client.chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT, max_tokens=4)
    last_id = last.headers["x-request-id"]
    assert gw.stop(timeout_s=60) == 0
    assert len(usage(gw, last_id)) == 1
    intervals = query(gw, "SELECT * FROM replica_intervals")
    assert all(i["ended_at"] is not None for i in intervals) and len(intervals) == 2

    owner = intervals[0]["owner"]
    # Every record names the gateway that served it: the owner of its replicas' intervals.
    assert {u["owner"] for u in query(gw, "SELECT owner FROM usage_records")} == {owner}
    start = min(ts(i["started_at"]) for i in intervals)
    end = max(ts(i["ended_at"]) for i in intervals)
    costs = [IntervalCost(i["owner"], i["replica_id"], i["pool"], i["usd_per_hour"], ts(i["started_at"]),
                          ts(i["ended_at"])) for i in intervals]
    slices = [UsageSlice(u["request_id"], u["owner"], u["replica_id"], u["tenant_id"], u["key_id"], u["model"],
                         u["pool"], ts(u["started_at"]), ts(u["ended_at"]), u["prompt_tokens"],
                         u["cached_tokens"], u["completion_tokens"])
              for u in query(gw, "SELECT * FROM usage_records")]
    result = attribute(costs, slices, start=start, end=end, weights=TokenWeights(0.25, 0.025, 1.0))
    tenant = rows[0]["tenant_id"]
    assert result.by("tenant")[tenant] > 0 and result.idle > 0
    assert result.attributed + result.idle == pytest.approx(result.total, rel=1e-9)
    assert result.total == pytest.approx(sum(i["usd_per_hour"] * (ts(i["ended_at"]) - ts(i["started_at"]))
                                             .total_seconds() / 3600 for i in intervals), rel=1e-9)



def test_an_unknown_instance_type_fails_start_up_listing_the_known_ones(tmp_path: Path) -> None:
    env = gateway_env(tmp_path / ".skyfleet", static_replicas=json.dumps(
        [{"url": "http://127.0.0.1:9", "model": "x", "instance_type": "g5.xlarg", "region": "us-east-1"}]))
    proc = subprocess.run([sys.executable, "-m", "skyfleet", "serve", "--replicas", "0", "--port", "0"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "static_replicas.0: unknown instance type 'g5.xlarg'. Did you mean g5.xlarge" in proc.stderr
    assert "Known: " in proc.stderr and "p5.48xlarge" in proc.stderr
