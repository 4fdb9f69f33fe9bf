"""Cost reports: windows, a hand-computed golden report (charged vs attributed vs idle, API-priced and
unpriced usage, a request straddling the window), grouping by every dimension, tenant scoping,
conservation as a property, the real read path on SQLite and PostgreSQL, the admin routes (roles,
tenant scoping, bad parameters) and the CLI (table, csv, json, svg, bad windows, advice)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert
from typer.testing import CliRunner

from skyfleet.cost.pricing import TokenPrices, TokenWeights
from skyfleet.cost.reports import (
    UNMETERED,
    CostReport,
    WindowError,
    build_report,
    csv_rows,
    parse_time,
    parse_window,
    report_svg,
)
from skyfleet.state import Store
from skyfleet.state.cost_queries import CostQueries, CostWindow, IntervalRow, UsageRow
from skyfleet.state.models import ReplicaInterval, ReplicaSample, UsageRecord
from tests.unit.iam_app import bearer, in_process_app

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
WEIGHTS = TokenWeights(prefill=0.25, cached=0.025, decode=1.0)
PRICES = {"gpt-x": TokenPrices(prompt_usd_per_mtok=1.0, cached_usd_per_mtok=0.5, completion_usd_per_mtok=2.0)}


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def iv(iid: str, owner: str, replica: str, start_s: float, end_s: float | None, *, usd: float = 36.0,
       pool: str = "local", itype: str | None = None, tier: str = "local") -> IntervalRow:
    end = None if end_s is None else at(end_s)
    return IntervalRow(iid, owner, replica, pool, "m", "llamacpp", itype, "us-east-1" if itype else None, tier, usd,
                       at(start_s), end, end or NOW)


def use(rid: str, tenant: str, start_s: float, end_s: float, *, completion: int = 10, replica: str | None = "local-0",
        pool: str | None = "local", model: str = "m", key: str | None = None, prompt: int = 0,
        charged: int = 1000, owner: str | None = None) -> UsageRow:
    return UsageRow(rid, tenant, key or f"key_{tenant}", model, "chat", replica, pool, "completed", 200, at(start_s),
                    at(end_s), 5, prompt, 0, completion, charged, owner)


def golden_window() -> CostWindow:
    # One replica at $36/h ($0.01/s), [0, 200] s; the window is [0, 100) s, so it costs $1.00 in the window.
    intervals = (iv("i1", "gw1", "local-0", 0, 200),)
    usage = (
        use("A", "ten_a", 10, 20, charged=2000),                 # alone for 10 s: $0.10
        use("B", "ten_b", 30, 40, charged=3000),                 # alone for 10 s: $0.10
        use("C", "ten_a", 50, 60, completion=10),                # with D: weight 10 of 40 -> $0.025
        use("D", "ten_b", 50, 60, completion=30, key="key_b2"),  # weight 30 of 40 -> $0.075
        use("H", "ten_b", 95, 105),                              # 5 s inside the window: $0.05, ended after it
        use("E", "ten_a", 70, 71, replica="static-9", pool="api", model="gpt-x", prompt=1000, completion=500,
            charged=2000),                                       # API-priced: 1000 x $1/M + 500 x $2/M = $0.002
        use("F", "ten_a", 72, 73, replica="static-8", pool="api", model="unknown"),  # no price at all
    )
    return CostWindow(start=T0, end=at(100), now=NOW, intervals=intervals, usage=usage)


def test_windows() -> None:
    assert parse_time("30m", NOW) == NOW - timedelta(minutes=30)
    assert parse_time(" 2w ", NOW) == NOW - timedelta(days=14)
    assert parse_time("2026-11-01", NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_time("2026-11-01T13:00:00+01:00", NOW) == T0
    assert parse_window("24h", None, NOW) == (NOW - timedelta(hours=24), NOW)
    assert parse_window("2026-11-01", "2099-01-01", NOW) == (datetime(2026, 11, 1, tzinfo=UTC), NOW)  # capped
    for since, until, message in [
        ("7x", None, "'since' must be an age"), ("-5h", None, "'since' must be"), ("", None, "'since' must be"),
        ("yesterday", None, "got 'yesterday'"), ("0h", None, "not in the past"), ("2099-01-01", None, "not in the past"),
        ("2h", "3h", "window is empty"), ("2h", "soon", "'until' must be"), ("401d", None, "longer than 400 days"),
        ("999999d", None, "'since' must be"),
    ]:
        with pytest.raises(WindowError, match=message):
            parse_window(since, until, NOW)


def test_golden_report_by_tenant() -> None:
    report = build_report(golden_window(), by="tenant", weights=WEIGHTS, token_prices=PRICES).named({"ten_a": "acme"})
    rows = {r.group: r for r in report.rows}
    assert [r.group for r in report.rows] == ["ten_b", "ten_a"]  # dearest first
    a, b = rows["ten_a"], rows["ten_b"]
    assert (a.name, b.name) == ("acme", "ten_b")
    assert a.attributed_usd == pytest.approx(0.10 + 0.025 + 0.002)
    assert b.attributed_usd == pytest.approx(0.10 + 0.075 + 0.05)
    assert (a.requests, b.requests) == (4, 2)  # H ended after the window: its tokens and charge are not here
    assert a.charged_usd == pytest.approx((2000 + 1000 + 2000 + 1000) / 1e6)
    assert b.charged_usd == pytest.approx((3000 + 1000) / 1e6)
    assert (a.prompt_tokens, a.completion_tokens) == (1000, 10 + 10 + 500 + 10)
    assert a.share + b.share == pytest.approx(1.0)
    assert b.share == pytest.approx(0.225 / 0.352)
    assert report.replica_cost_usd == pytest.approx(1.0)
    assert report.attributed_total_usd == pytest.approx(0.35)
    assert report.idle_total_usd == pytest.approx(0.65)
    assert report.api_usd == pytest.approx(0.002) and report.unpriced_requests == 1
    assert report.conserved and report.conservation_error < 1e-9
    (pool,) = report.idle_pools
    (replica,) = report.idle_replicas
    assert (pool.pool, pool.cost_usd, pool.idle_usd) == ("local", pytest.approx(1.0), pytest.approx(0.65))
    assert (replica.replica, replica.instance_type, replica.idle_share) == ("gw1/local-0", "local", pytest.approx(0.65))
    body = report.json()
    assert body["totals"]["conserved"] is True and body["totals"]["requests"] == 6
    assert body["idle"]["replicas"][0]["replica"] == "gw1/local-0"
    assert json.loads(json.dumps(body)) == body


@pytest.mark.parametrize(("by", "expected"), [
    ("model", {"m": 0.35, "gpt-x": 0.002, "unknown": 0.0}),
    ("key", {"key_ten_a": 0.127, "key_ten_b": 0.15, "key_b2": 0.075}),
    ("pool", {"local": 0.35, "api": 0.002}),
    ("instance-type", {"local": 0.35, UNMETERED: 0.002}),
])
def test_golden_report_other_dimensions(by: str, expected: dict[str, float]) -> None:
    report = build_report(golden_window(), by=by, weights=WEIGHTS, token_prices=PRICES)
    got = {r.group: r.attributed_usd for r in report.rows}
    assert got == {k: pytest.approx(v) for k, v in expected.items()}
    assert sum(r.requests for r in report.rows) == 6


def test_tenant_scoped_report_shows_only_its_rows() -> None:
    report = build_report(golden_window(), by="model", weights=WEIGHTS, token_prices=PRICES, tenant_ids={"ten_b"})
    assert [(r.group, r.requests) for r in report.rows] == [("m", 2)]
    assert report.rows[0].attributed_usd == pytest.approx(0.225) and report.rows[0].share == 1.0
    assert report.scoped and report.idle_pools == () and report.conserved is None
    body = report.json()
    assert "idle" not in body and "replica_cost_usd" not in body["totals"]


def test_local_replicas_of_two_gateways_are_told_apart_by_time() -> None:
    window = CostWindow(start=T0, end=at(100), now=NOW, intervals=(
        iv("i1", "gw1", "local-0", 0, 50), iv("i2", "gw2", "local-0", 50, 100),
        iv("i3", "gw3", "local-0", 0, 100, pool="other")), usage=(
        use("A", "ten_a", 10, 20), use("B", "ten_b", 60, 70)))
    report = build_report(window, by="tenant", weights=WEIGHTS)
    assert {r.replica: round(r.idle_usd, 6) for r in report.idle_replicas} == {
        "gw1/local-0": 0.4, "gw2/local-0": 0.4, "gw3/local-0": 1.0}
    assert report.conserved


def two_gateways_window(*, with_owner: bool = True) -> CostWindow:
    """Two gateways each running a ``local-0`` in pool ``local`` over the whole window ($36/h: $1 each),
    and a static replica both list (owner ``static``); one request on each ``local-0`` at the same time."""
    def owner(gw: str) -> str | None:
        return gw if with_owner else None

    intervals = (iv("i1", "gw1", "local-0", 0, 100), iv("i2", "gw2", "local-0", 0, 100),
                 iv("i3", "static", "ext-0", 0, 100, pool="ext", itype="g5.xlarge", tier="on-demand"))
    usage = (use("A", "ten_a", 10, 30, completion=10, owner=owner("gw1")),
             use("B", "ten_b", 10, 30, completion=30, owner=owner("gw2")),
             use("C", "ten_b", 50, 60, completion=10, replica="ext-0", pool="ext", owner=owner("gw2")))
    return CostWindow(start=T0, end=at(100), now=NOW, intervals=intervals, usage=usage)


def split(report: CostReport) -> tuple[dict[str, float], dict[str | None, float]]:
    return ({r.group: round(r.attributed_usd, 9) for r in report.rows},
            {r.replica: round(r.idle_usd, 9) for r in report.idle_replicas})


#: Each request alone on its own gateway's local-0 for 20 s ($0.20), C alone on the static replica ($0.10).
TWO_GATEWAYS = ({"ten_a": 0.2, "ten_b": 0.3}, {"gw1/local-0": 0.8, "gw2/local-0": 0.8, "static/ext-0": 0.9})


def test_same_named_replicas_of_two_gateways_are_joined_on_the_owner() -> None:
    report = build_report(two_gateways_window(), by="tenant", weights=WEIGHTS)
    assert split(report) == TWO_GATEWAYS
    assert report.conserved and report.replica_cost_usd == pytest.approx(3.0)
    by_type = build_report(two_gateways_window(), by="instance-type", weights=WEIGHTS)
    assert {r.group: round(r.attributed_usd, 9) for r in by_type.rows} == {"local": 0.4, "g5.xlarge": 0.1}


def test_records_without_an_owner_keep_the_old_guess() -> None:
    # Written before migration 0007: both requests are guessed onto the earliest local-0 (gw1's) and share
    # it by weight (10 : 30 of $0.20); gw2's looks idle throughout. The documented limitation.
    report = build_report(two_gateways_window(with_owner=False), by="tenant", weights=WEIGHTS)
    assert split(report) == ({"ten_a": 0.05, "ten_b": 0.25},
                             {"gw1/local-0": 0.8, "gw2/local-0": 1.0, "static/ext-0": 0.9})
    assert report.conserved


def test_csv_and_svg() -> None:
    report = build_report(golden_window(), by="tenant", weights=WEIGHTS, token_prices=PRICES).named(
        {"ten_a": "<script>alert(1)</script>"})
    rows = list(csv.reader(io.StringIO("".join(",".join(r) + "\n" for r in csv_rows(report)))))
    assert rows[0] == ["tenant", "name", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                       "charged_usd", "attributed_usd", "idle_usd", "share"]
    assert rows[-1] == ["(idle)", "local", "", "", "", "", "", "", "0.650000", ""]
    svg = report_svg(report)
    assert svg.startswith("<svg") and "<script>" not in svg and "&lt;script&gt;" in svg
    assert svg.count("<rect") == 1 + 3  # background + two tenants + idle of one pool
    empty = CostReport("tenant", T0, at(1), (), (), (), 0.0, 0.0, 0.0)
    assert "no cost in this window" in report_svg(empty)


def test_bad_dimension() -> None:
    with pytest.raises(ValueError, match="'by' must be one of"):
        build_report(golden_window(), by="colour", weights=WEIGHTS)


@st.composite
def windows(draw: st.DrawFn) -> CostWindow:
    n_rep = draw(st.integers(1, 3))
    intervals = []
    for r in range(n_rep):
        s = draw(st.floats(-50, 90))
        e = draw(st.one_of(st.none(), st.floats(s + 0.5, 200)))
        intervals.append(iv(f"i{r}", "gw", f"r{r}", s, e, usd=draw(st.floats(0.01, 100))))
    usage = []
    for i in range(draw(st.integers(0, 12))):
        s = draw(st.floats(-20, 110))
        usage.append(use(f"u{i}", draw(st.sampled_from(["ten_a", "ten_b"])), s, s + draw(st.floats(0, 30)),
                         completion=draw(st.integers(0, 50)), prompt=draw(st.integers(0, 50)),
                         replica=f"r{draw(st.integers(0, n_rep))}"))
    return CostWindow(start=T0, end=at(100), now=at(150), intervals=tuple(intervals), usage=tuple(usage))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows(), st.sampled_from(["tenant", "model", "key", "pool", "instance-type"]))
def test_attributed_plus_idle_is_the_replica_cost(window: CostWindow, by: str) -> None:
    report = build_report(window, by=by, weights=WEIGHTS)
    assert report.conserved, report.totals()
    assert sum(r.attributed_usd for r in report.rows) == pytest.approx(report.attributed_total_usd, abs=1e-9)
    assert sum(r.share for r in report.rows) == pytest.approx(1.0 if report.attributed_total_usd else 0.0)
    assert all(r.attributed_usd >= 0 and 0 <= r.share <= 1 + 1e-9 for r in report.rows)


# -- the real read path ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("pg_database_url")
    return url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


def _record(u: UsageRow) -> dict[str, Any]:
    return {f: getattr(u, f) for f in UsageRow.__slots__}  # type: ignore[attr-defined]


def _interval(i: IntervalRow) -> dict[str, Any]:
    return {f: getattr(i, f) for f in IntervalRow.__slots__}  # type: ignore[attr-defined]


async def seed(store: Store, tenants: dict[str, str] | None = None) -> None:
    """The golden window's rows in a real database (tenant ids renamed through ``tenants``)."""
    window = golden_window()
    tenants = tenants or {}
    usage = [_record(u) | {"tenant_id": tenants.get(u.tenant_id, u.tenant_id)} for u in window.usage]
    async with store.engine.begin() as conn:
        await conn.execute(insert(UsageRecord), usage)
        await conn.execute(insert(ReplicaInterval), [_interval(i) for i in window.intervals])


async def test_report_from_the_database(store: Store) -> None:
    await seed(store)
    window = await CostQueries(store.engine).window(T0, at(100), NOW)
    report = build_report(window, by="tenant", weights=WEIGHTS, token_prices=PRICES)
    assert {r.group: round(r.attributed_usd, 9) for r in report.rows} == {"ten_a": 0.127, "ten_b": 0.225}
    assert report.idle_total_usd == pytest.approx(0.65) and report.conserved


async def test_two_gateways_local_0_split_per_owner_from_the_database(store: Store) -> None:
    window = two_gateways_window()
    async with store.engine.begin() as conn:
        await conn.execute(insert(UsageRecord), [_record(u) for u in window.usage])
        await conn.execute(insert(ReplicaInterval), [_interval(i) for i in window.intervals])
    read = await CostQueries(store.engine).window(T0, at(100), NOW)
    assert {u.request_id: u.owner for u in read.usage} == {"A": "gw1", "B": "gw2", "C": "gw2"}
    report = build_report(read, by="tenant", weights=WEIGHTS)
    assert split(report) == TWO_GATEWAYS and report.conserved
    assert {p.pool: round(p.idle_usd, 9) for p in report.idle_pools} == {"local": 1.6, "ext": 0.9}


# -- the admin routes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    prices = {"gpt-x": {"prompt_usd_per_mtok": 1.0, "cached_usd_per_mtok": 0.5, "completion_usd_per_mtok": 2.0}}
    async with in_process_app(tmp_path_factory.mktemp("costs"), cost={"api_prices": prices}) as built:
        acme = await built.gw.store.tenants.get("acme")
        globex = await built.gw.store.tenants.get("globex")
        await seed(built.gw.store, {"ten_a": acme.id, "ten_b": globex.id})
        yield built


async def test_usage_route_pages_and_scopes(app: Any) -> None:
    async with app.http() as h:
        r = await h.get("/admin/v1/usage", params={"since": "2026-11-01", "limit": 3},
                        headers=bearer(app.keys["platform-admin"]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["request_id"] for d in body["data"]] == ["H", "F", "E"] and body["has_more"]
        assert body["data"][0]["tenant"] == "globex" and body["data"][0]["charged_usd"] == 0.001
        r = await h.get("/admin/v1/usage", params={"since": "2026-11-01", "after": body["last_id"]},
                        headers=bearer(app.keys["platform-admin"]))
        assert [d["request_id"] for d in r.json()["data"]] == ["C", "D", "B", "A"] or \
            [d["request_id"] for d in r.json()["data"]] == ["D", "C", "B", "A"]
        r = await h.get("/admin/v1/usage", params={"tenant": "globex", "model": "m", "key": "key_b2"},
                        headers=bearer(app.keys["platform-admin"]))
        assert [d["request_id"] for d in r.json()["data"]] == ["D"]
        # A tenant-admin sees its own tenant only, and may not name another.
        r = await h.get("/admin/v1/usage", headers=bearer(app.keys["tenant-admin"]))
        assert {d["tenant"] for d in r.json()["data"]} == {"acme"} and len(r.json()["data"]) == 4
        r = await h.get("/admin/v1/usage", params={"tenant": "globex"}, headers=bearer(app.keys["tenant-admin"]))
        assert r.status_code == 403
        r = await h.get("/admin/v1/usage", params={"after": "H"}, headers=bearer(app.keys["tenant-admin"]))
        assert r.status_code == 400 and r.json()["error"]["param"] == "after"  # another tenant's record
        for role in ("member", "read-only"):
            assert (await h.get("/admin/v1/usage", headers=bearer(app.keys[role]))).status_code == 403
        assert (await h.get("/admin/v1/usage")).status_code == 401


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/admin/v1/usage", {"limit": "0"}, "limit"), ("/admin/v1/usage", {"limit": "1001"}, "limit"),
    ("/admin/v1/usage", {"limit": "x"}, "limit"), ("/admin/v1/usage", {"since": "yesterday"}, "since"),
    ("/admin/v1/usage", {"until": "7q"}, "until"), ("/admin/v1/usage", {"since": "1h", "until": "2h"}, "since"),
    ("/admin/v1/usage", {"after": "nope"}, "after"), ("/admin/v1/usage", {"after": "a b"}, "after"),
    ("/admin/v1/usage", {"model": "m" * 201}, "model"), ("/admin/v1/usage", {"colour": "red"}, "colour"),
    ("/admin/v1/costs", {"by": "colour"}, "by"), ("/admin/v1/costs", {"since": "0h"}, "since"),
    ("/admin/v1/costs", {"since": "2099-01-01"}, "since"), ("/admin/v1/costs", {"since": "999d"}, "since"),
    ("/admin/v1/costs", {"since": "99999999d"}, "since"), ("/admin/v1/costs", {"limit": "3"}, "limit"),
])
async def test_bad_parameters_are_400s(app: Any, path: str, params: dict[str, str], param: str) -> None:
    async with app.http() as h:
        r = await h.get(path, params=params, headers=bearer(app.keys["platform-admin"]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == param


async def test_unknown_tenant_is_404(app: Any) -> None:
    async with app.http() as h:
        for path in ("/admin/v1/usage", "/admin/v1/costs"):
            r = await h.get(path, params={"tenant": "nobody"}, headers=bearer(app.keys["platform-admin"]))
            assert r.status_code == 404 and r.json()["error"]["param"] == "tenant"


async def test_costs_route(app: Any) -> None:
    since = {"since": "2026-11-01T12:00:00Z", "until": "2026-11-01T12:01:40Z"}
    async with app.http() as h:
        r = await h.get("/admin/v1/costs", params={"by": "tenant", **since}, headers=bearer(app.keys["platform-admin"]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert {row["name"]: row["attributed_usd"] for row in body["rows"]} == {"acme": 0.127, "globex": 0.225}
        assert body["totals"]["idle_usd"] == pytest.approx(0.65) and body["totals"]["conserved"] is True
        r = await h.get("/admin/v1/costs", params=since, headers=bearer(app.keys["tenant-admin"]))
        body = r.json()
        assert [row["name"] for row in body["rows"]] == ["acme"] and "idle" not in body
        r = await h.get("/admin/v1/costs", params={"tenant": "globex"}, headers=bearer(app.keys["tenant-admin"]))
        assert r.status_code == 403
        assert (await h.get("/admin/v1/costs", headers=bearer(app.keys["member"]))).status_code == 403


# -- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    import asyncio

    data = tmp_path / "data"

    async def go() -> None:
        store = await Store.open(f"sqlite+aiosqlite:///{data / 'skyfleet.db'}")
        try:
            await seed(store)
            start = datetime.now(UTC) - timedelta(hours=2)
            async with store.engine.begin() as conn:  # a replica that ran the last two hours, nearly idle
                await conn.execute(insert(ReplicaInterval), [_interval(IntervalRow(
                    "i9", "gw9", "r9", "big", "llama-3.1-8b-instruct", "vllm", "g5.12xlarge", "us-east-1",
                    "on-demand", 5.672, start, None, datetime.now(UTC)))])
                await conn.execute(insert(ReplicaSample), [
                    {"owner": "gw9", "replica_id": "r9", "at": start + timedelta(minutes=m), "pool": "big",
                     "running": 1.0, "waiting": 0.0, "kv_cache_usage": 0.05, "busy_fraction": 0.05,
                     "tokens_per_s": 3.0} for m in range(0, 120, 5)])
        finally:
            await store.close()

    asyncio.run(go())
    return data


def _cli(data_dir: Path, *args: str) -> Any:
    from skyfleet.cli.app import app

    return CliRunner().invoke(app, ["cost", *args], env={"SKYFLEET_DATA_DIR": str(data_dir)})


def test_cli_report_formats(data_dir: Path, tmp_path: Path) -> None:
    got = _cli(data_dir, "report", "--by", "tenant", "--since", "2026-11-01T12:00:00Z",
               "--until", "2026-11-01T12:01:40Z", "--format", "json")
    assert got.exit_code == 0, got.output
    body = json.loads(got.stdout)
    # No cost.api_prices configured here: the API-priced request is unpriced like the other one.
    assert {r["group"]: r["attributed_usd"] for r in body["rows"]} == {"ten_a": 0.125, "ten_b": 0.225}
    assert body["totals"]["unpriced_requests"] == 2 and body["totals"]["conserved"] is True
    got = _cli(data_dir, "report", "--since", "2026-11-01T12:00:00Z", "--until", "2026-11-01T12:01:40Z",
               "--format", "csv", "--by", "pool")
    assert got.stdout.splitlines()[0].startswith("pool,name,requests") and "(idle),local" in got.stdout
    plot = tmp_path / "cost.svg"
    got = _cli(data_dir, "report", "--since", "30d", "--plot", str(plot))
    assert got.exit_code == 0, got.output
    assert "Cost by tenant" in got.stdout and "check: attributed" in got.stdout and "OK" in got.stdout
    assert plot.read_text().startswith("<svg")


@pytest.mark.parametrize(("args", "message"), [
    (("--since", "7x"), "'since' must be"), (("--since", "0h"), "not in the past"),
    (("--by", "colour"), "not one of"), (("--format", "xml"), "not one of"),
    (("--plot", "out.png"), "only SVG"), (("--tenant", "nobody"), "tenant 'nobody' not found"),
])
def test_cli_report_bad_input(data_dir: Path, args: tuple[str, ...], message: str) -> None:
    got = _cli(data_dir, "report", *args)
    assert got.exit_code != 0 and message in " ".join(got.output.replace("│", " ").split())


def test_cli_advise(data_dir: Path) -> None:
    got = _cli(data_dir, "advise", "--window", "3h", "--format", "json")
    assert got.exit_code == 0, got.output
    body = json.loads(got.stdout)
    kinds = [(r["pool"], r["kind"]) for r in body["recommendations"]]
    assert ("big", "over_provisioned") in kinds and ("big", "cheaper_instance") in kinds
    got = _cli(data_dir, "advise", "--window", "3h")
    assert "pool big was idle" in " ".join(got.stdout.split()) and "/month" in got.stdout
    got = _cli(data_dir, "advise", "--window", "nonsense")
    assert got.exit_code != 0 and "--window" in got.output
