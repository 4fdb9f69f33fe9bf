"""skyfleet cost report|advise: what the fleet cost, who it was for, and how to pay less.

Both read the state store directly (like the other commands, whoever runs them has database
access), so they work while gateways run and after they stopped.
"""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

if TYPE_CHECKING:
    from skyfleet.config import Settings
    from skyfleet.cost.advice import Recommendation, UtilisationSummary
    from skyfleet.cost.reports import CostReport
    from skyfleet.state.repositories import Store

app = typer.Typer(help="Cost reports and right-sizing advice.", no_args_is_help=True)

_BY = ("tenant", "model", "key", "pool", "instance-type")
_FORMATS = ("table", "csv", "json")


def _choice(value: str, allowed: tuple[str, ...], hint: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"'{value}' is not one of {', '.join(allowed)}", param_hint=hint)
    return value


def _window(since: str, until: str | None, now: datetime, hint: str = "--since") -> tuple[datetime, datetime]:
    from skyfleet.cost.reports import WindowError, parse_window

    try:
        return parse_window(since, until, now)
    except WindowError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None


def usd(x: float, digits: int | None = None) -> str:
    """Dollars with the precision small amounts need ($0.000412, $0.0312, $12.40, $1,204.00)."""
    if digits is None:
        digits = money_digits([x])
    return f"${x:,.{digits}f}"


def money_digits(values: list[float]) -> int:
    """Decimals that show the smallest non-zero amount of a column (2, 4 or 6), so a table lines up."""
    smallest = min((abs(v) for v in values if v), default=1.0)
    return 2 if smallest >= 1 else 4 if smallest >= 0.01 else 6


@app.command("report")
def report(
    by: Annotated[str, typer.Option("--by", help="Group by: tenant, model, key, pool or instance-type.")] = "tenant",
    since: Annotated[str, typer.Option(help="Start: an age (30m, 24h, 7d, 2w) or an ISO 8601 date/time "
                                            "(UTC if no zone).")] = "7d",
    until: Annotated[str | None, typer.Option(help="End (same forms as --since). Default: now.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")] = "table",
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant's usage (by name); "
                                               "no fleet-wide idle cost then.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw the report as an SVG bar chart to this file "
                                              "(.svg).")] = None,
    config: ConfigOption = None,
) -> None:
    """Usage and cost over a window: charged vs attributed per group, idle cost per pool and replica."""
    _choice(by, _BY, "--by")
    _choice(fmt, _FORMATS, "--format")
    if plot is not None and plot.suffix.lower() != ".svg":
        raise typer.BadParameter("only SVG is drawn (no plotting library is installed): give a .svg path",
                                 param_hint="--plot")
    settings = settings_or_exit(config)
    now = datetime.now(UTC)
    start, end = _window(since, until, now)
    result = run_with_store(settings, lambda store: _build(store, settings, by, start, end, now, tenant))
    if fmt == "json":
        echo_json(result.json())
    elif fmt == "csv":
        _print_csv(result)
    else:
        _print_table(result)
    if plot is not None:
        from skyfleet.cost.reports import report_svg

        plot.write_text(report_svg(result))
        typer.echo(f"wrote {plot}", err=True)


async def _build(store: Store, settings: Settings, by: str, start: datetime, end: datetime, now: datetime,
                 tenant: str | None) -> CostReport:
    import asyncio

    from skyfleet.cost.pricing import api_prices, token_weights
    from skyfleet.cost.reports import build_report
    from skyfleet.errors import NotFoundError
    from skyfleet.state.cost_queries import CostQueries

    queries = CostQueries(store.engine)
    tenant_ids = None
    if tenant is not None:
        tenant_ids = await queries.tenant_ids(tenant)
        if not tenant_ids:
            raise NotFoundError(f"tenant '{tenant[:100]}' not found")
    window = await queries.window(start, end, now)
    built = await asyncio.to_thread(build_report, window, by=by, weights=token_weights(settings),
                                    token_prices=api_prices(settings), tenant_ids=tenant_ids)
    groups = [r.group for r in built.rows]
    names = (await queries.tenant_names(groups) if by == "tenant" else
             await queries.key_names(groups) if by == "key" else {})
    return built.named(names)


def _print_csv(result: CostReport) -> None:
    from skyfleet.cost.reports import csv_rows

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerows(csv_rows(result))


def _print_table(result: CostReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = result.totals()
    money = [v for r in result.rows for v in (r.charged_usd, r.attributed_usd)]
    money += [v for r in (*result.idle_pools, *result.idle_replicas) for v in (r.cost_usd, r.idle_usd)]
    digits = money_digits(money)
    span = f"{result.start:%Y-%m-%d %H:%M} to {result.end:%Y-%m-%d %H:%M} UTC"
    table = Table(title=f"Cost by {result.by}, {span}", title_justify="left")
    table.add_column(result.by)
    for name in ("requests", "prompt", "cached", "completion", "charged", "attributed", "share"):
        table.add_column(name, justify="right")
    for r in result.rows:
        label = r.group if r.name == r.group else f"{r.name} ({r.group})"
        table.add_row(label, f"{r.requests:,}", f"{r.prompt_tokens:,}", f"{r.cached_tokens:,}",
                      f"{r.completion_tokens:,}", usd(r.charged_usd, digits), usd(r.attributed_usd, digits),
                      f"{r.share:.1%}")
    table.add_section()
    table.add_row("total", f"{t['requests']:,}", f"{t['prompt_tokens']:,}", f"{t['cached_tokens']:,}",
                  f"{t['completion_tokens']:,}", usd(t["charged_usd"], digits), usd(t["attributed_usd"], digits),
                  "100.0%" if result.rows else "", style="bold")
    console.print(table)
    if not result.rows:
        console.print("no usage in this window")
    if result.scoped:
        return
    idle = Table(title="Idle: replica time that served no request", title_justify="left")
    for name, justify in (("pool", "left"), ("replica", "left"), ("instance type", "left"), ("cost", "right"),
                          ("idle", "right"), ("idle share", "right")):
        idle.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in result.idle_pools:
        idle.add_row(p.pool, "(pool)", "", usd(p.cost_usd, digits), usd(p.idle_usd, digits), f"{p.idle_share:.1%}",
                     style="bold")
        for r in result.idle_replicas:
            if r.pool == p.pool:
                idle.add_row("", r.replica or "", r.instance_type or "", usd(r.cost_usd, digits),
                             usd(r.idle_usd, digits), f"{r.idle_share:.1%}")
    if result.idle_pools:
        console.print(idle)
    else:
        console.print("no replica ran in this window")
    assert result.replica_cost_usd is not None and result.idle_total_usd is not None
    assert result.attributed_total_usd is not None and result.conservation_error is not None
    ok = "[green]OK[/green]" if result.conserved else "[red]MISMATCH[/red]"
    console.print(f"check: attributed {usd(result.attributed_total_usd, digits)} + idle "
                  f"{usd(result.idle_total_usd, digits)} = "
                  f"{usd(result.attributed_total_usd + result.idle_total_usd, digits)}; total replica cost "
                  f"{usd(result.replica_cost_usd, digits)} ({ok}, off by {result.conservation_error:.4%})",
                  highlight=False)
    if result.api_usd:
        console.print(f"API-priced usage (per-token prices, apart from replica time): {usd(result.api_usd, digits)}",
                      highlight=False)
    if result.unpriced_requests:
        console.print(f"{result.unpriced_requests} request(s) ran on no recorded replica and have no per-token "
                      "price (cost.api_prices): not in the attributed cost", highlight=False)


@app.command("advise")
def advise(
    window: Annotated[str, typer.Option(help="Look back this far: an age (24h, 7d) or an ISO 8601 start.")] = "24h",
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    config: ConfigOption = None,
) -> None:
    """Right-sizing: over-provisioned pools, and cheaper configurations with their saving per month."""
    _choice(fmt, ("table", "json"), "--format")
    settings = settings_or_exit(config)
    now = datetime.now(UTC)
    start, end = _window(window, None, now, hint="--window")
    summary, recs = run_with_store(settings, lambda store: _advise(store, settings, start, end, now))
    if fmt == "json":
        echo_json({"object": "cost_advice", "since": start.isoformat(), "until": end.isoformat(),
                   "pools": [_pool_json(p) for p in summary.pools], "recommendations": [r.json() for r in recs]})
    else:
        _print_advice(summary, recs)


async def _advise(store: Store, settings: Settings, start: datetime, end: datetime,
                  now: datetime) -> tuple[UtilisationSummary, list[Recommendation]]:
    import asyncio

    from skyfleet.cost.advice import SampleFolder, summarise
    from skyfleet.cost.advice import advise as make_advice
    from skyfleet.cost.pricing import api_prices, token_weights
    from skyfleet.cost.reports import build_report, idle_by_pool
    from skyfleet.state.cost_queries import CostQueries

    queries = CostQueries(store.engine)
    window = await queries.window(start, end, now)
    built = await asyncio.to_thread(build_report, window, by="pool", weights=token_weights(settings),
                                    token_prices=api_prices(settings))
    folder = SampleFolder()
    async for page in queries.sample_pages(start, end):
        folder.add(page)
    summary = summarise(window.intervals, folder.finish(), start=start, end=end, now=now, idle=idle_by_pool(built))
    return summary, make_advice(summary, _catalog(settings), now=now)


def _catalog(settings: Settings) -> Any:
    from skyfleet.cost.catalog import Catalog, PriceOverride

    overrides = [PriceOverride(o.instance_type, o.region, o.ondemand_usd_per_hr, o.spot_usd_per_hr)
                 for o in settings.cost.price_overrides]
    return Catalog.builtin().with_overrides(overrides)


def _pool_json(p: Any) -> dict[str, Any]:
    return {"pool": p.pool, "model": p.model, "replicas": len(p.current), "cost_usd": round(p.cost_usd, 6),
            "idle_fraction": p.idle_fraction, "idle_source": p.idle_source, "samples": p.samples,
            "peak_kv_cache_usage": p.peak_kv_cache_usage, "peak_busy_replicas": p.peak_busy_replicas,
            "median_busy_replicas": p.median_busy_replicas, "peak_concurrency": p.peak_concurrency,
            "peak_waiting": p.peak_waiting}


def _print_advice(summary: UtilisationSummary, recs: list[Recommendation]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    hours = (summary.end - summary.start).total_seconds() / 3600
    pools = Table(title=f"Pools over the last {hours:.1f} h", title_justify="left")
    for name in ("pool", "replicas now", "cost", "idle", "peak busy", "peak KV", "samples"):
        pools.add_column(name, justify="left" if name == "pool" else "right")
    for p in summary.pools:
        pools.add_row(p.pool, str(len(p.current)), usd(p.cost_usd),
                      "" if p.idle_fraction is None else f"{p.idle_fraction:.0%}",
                      "" if p.peak_busy_replicas is None else f"{p.peak_busy_replicas:.2f}",
                      "" if p.peak_kv_cache_usage is None else f"{p.peak_kv_cache_usage:.0%}", str(p.samples))
    if summary.pools:
        console.print(pools)
    if not recs:
        console.print("Nothing to advise: no pool was mostly idle, and no cheaper configuration would have "
                      "carried what this window saw.")
        return
    for r in recs:
        console.print(f"[bold]{r.kind}[/bold] {r.summary}", highlight=False)
        if r.proposed:
            console.print(f"    now: {r.current}\n    try: {r.proposed}", highlight=False)
        for a in r.assumptions:
            console.print(f"    [dim]assumes {a}[/dim]", highlight=False)
    console.print("[dim]Each saving is against the current configuration on its own; they do not add up.[/dim]")
