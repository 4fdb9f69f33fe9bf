"""skyfleet simulate: replay a trace on a fleet spec under several scaling policies and compare them.

Reads a trace (:func:`skyfleet.planner.traces.load_trace`; ``--slice`` and ``--rate`` as in ``skyfleet plan``),
a fleet spec (one model of it: ``--model``, default the only one), an engine profile per pool (``--profile
POOL=FILE``, else the built-in profile book's for the pool's instance type and the model), optionally spot
traces (``--spot-trace NAME``: one trace for every spot pool; ``--spot-auto``: one per spot pool by region,
see :mod:`skyfleet.planner.spot`), and runs :func:`skyfleet.planner.policies.compare`. Prints a table (or
JSON) and writes an HTML report with ``--report DIR``. Exit 2 on bad arguments or inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from skyfleet.cli.plan import parse_slice

if TYPE_CHECKING:
    from skyfleet.fleet.spec import ModelFleet
    from skyfleet.planner.results import SimResult
    from skyfleet.planner.types import EngineProfile

_FORMATS = ("table", "json")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def pool_profiles(fleet: ModelFleet, model: str, overrides: list[str], *, catalog: Any, book: Any) \
        -> dict[str, EngineProfile]:
    """Each pool's profile: ``POOL=FILE`` overrides, else the book's for the pool's instance type and ``model``."""
    from skyfleet.planner.profiles import read_profile

    given: dict[str, EngineProfile] = {}
    names = {p.name for p in fleet.pools}
    for item in overrides:
        pool, sep, path = item.partition("=")
        if not sep or not path:
            raise typer.BadParameter(f"'{item}' is not POOL=FILE", param_hint="--profile")
        if pool not in names:
            raise typer.BadParameter(f"no pool '{pool}' in the fleet (pools: {', '.join(sorted(names))})",
                                     param_hint="--profile")
        given[pool] = read_profile(path)
    out: dict[str, EngineProfile] = {}
    for p in fleet.pools:
        if p.name in given:
            out[p.name] = given[p.name]
            continue
        found = book.for_instance(catalog.get(p.instance_type, p.region), model, fleet.engine)
        if found is None:
            raise typer.BadParameter(
                f"pool '{p.name}': no engine profile for {model} on {fleet.engine} with {p.instance_type}; "
                f"give one with --profile {p.name}=FILE", param_hint="--profile")
        out[p.name] = found
    return out


def _table(results: dict[str, SimResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    from skyfleet.planner.report import summary_rows

    first = next(iter(results.values()))
    t = Table(title=f"{first.trace}: {first.requests} requests, SLO TTFT p95 {first.slo['ttft_s']:g} s, "
                    f"TPOT p95 {first.slo['tpot_s']:g} s")
    for col in ("policy", "cost $", "GPU-h", "SLO met", "TTFT p95", "TPOT p95", "preempt", "retried", "dropped"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in summary_rows(results):
        slo = r["slo_attainment"]
        t.add_row(r["policy"], f"{r['cost_usd']:.2f}", f"{r['gpu_hours']:.2f}",
                  "-" if slo is None else f"{100 * slo:.2f}%",
                  "-" if r["ttft_p95_s"] is None else f"{r['ttft_p95_s']:.3f}",
                  "-" if r["tpot_p95_s"] is None else f"{r['tpot_p95_s']:.4f}",
                  str(r["preemptions"]), str(r["retried"]), str(r["dropped"]))
    Console().print(t)


def simulate(
    trace: Annotated[str, typer.Option(help="Trace: azure:PATH, mooncake:PATH, usage:DATABASE_URL or a file.")],
    fleet: Annotated[Path, typer.Option(help="Fleet spec YAML (as for the fleet controller).")],
    model: Annotated[str | None, typer.Option(help="Model of the fleet spec (default: its only one).")] = None,
    profile_model: Annotated[str | None, typer.Option(
        help="Model name in the profile book (default: --model).")] = None,
    profile: Annotated[list[str] | None, typer.Option(
        help="POOL=FILE: the engine profile of a pool (repeatable); default: the profile book's.")] = None,
    policies: Annotated[str, typer.Option(help="Comma-separated policies to compare.")] =
        "static-peak,reactive,skyfleet,oracle",
    rate: Annotated[float | None, typer.Option(help="Scale the trace's request rate (2 = twice as fast).")] = None,
    slice_: Annotated[str | None, typer.Option("--slice", help="START:END of the trace (e.g. 0:30m).")] = None,
    spot_trace: Annotated[str | None, typer.Option(
        help="Spot trace (id or unique part of one) for every spot pool.")] = None,
    spot_auto: Annotated[bool, typer.Option(help="A spot trace per spot pool, by region.")] = False,
    spot_offset: Annotated[float, typer.Option(help="Spot trace time at the start of the replay, s.")] = 0.0,
    routing: Annotated[str, typer.Option(help="Routing policy: affinity, least-load, round-robin.")] = "affinity",
    report: Annotated[Path | None, typer.Option(help="Write the HTML report into this folder.")] = None,
    format_: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    processes: Annotated[int, typer.Option(help="Worker processes (1 shows progress).")] = 1,
    warm: Annotated[bool, typer.Option(help="Adaptive policies start from a fleet sized for the first minutes "
                                            "(else from their first decision).")] = True,
) -> None:
    """Replay a trace on a fleet under several scaling policies: cost, SLO attainment, latency, preemptions."""
    from skyfleet.config import ConfigError
    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.spec import load_fleet_spec
    from skyfleet.planner.policies import POLICIES, compare
    from skyfleet.planner.profiles import ProfileBook
    from skyfleet.planner.spot import SpotTraceError, load_spot_traces, map_spot_pools
    from skyfleet.planner.traces import load_trace, scale, time_slice

    if format_ not in _FORMATS:
        raise typer.BadParameter(f"'{format_}' is not one of {', '.join(_FORMATS)}", param_hint="--format")
    names = [p.strip() for p in policies.split(",") if p.strip()]
    from skyfleet.fleet.policy import policy_names

    known = set(POLICIES) | set(policy_names())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise typer.BadParameter(f"unknown policies {bad}; known: {', '.join(sorted(known))}",
                                 param_hint="--policies")
    catalog = Catalog.builtin()
    try:
        spec = load_fleet_spec(fleet, catalog)
        if model is None:
            if len(spec.models) != 1:
                raise typer.BadParameter(f"the fleet has models {sorted(spec.models)}: pick one", param_hint="--model")
            model = next(iter(spec.models))
        if model not in spec.models:
            raise typer.BadParameter(f"no model '{model}' in {fleet}", param_hint="--model")
        mf = spec.models[model]
        tr = load_trace(trace)
        if slice_:
            lo, hi = parse_slice(slice_)
            tr = time_slice(tr, lo, hi)
        if rate is not None:
            tr = scale(tr, rate)
        if len(tr) == 0:
            _fail("the trace (after --slice) has no request")
        profiles = pool_profiles(mf, profile_model or model, profile or [], catalog=catalog, book=ProfileBook.builtin())
        spot: dict[str, Any] = {}
        if spot_trace or spot_auto:
            spot = map_spot_pools(mf, load_spot_traces(), spot_trace, offset_s=spot_offset)
    except (ConfigError, SpotTraceError, ValueError, OSError) as exc:
        if isinstance(exc, typer.BadParameter):
            raise
        _fail(str(exc))
        return
    quiet = format_ == "json" or processes > 1 or not sys.stderr.isatty()
    kw: dict[str, Any] = {"routing": routing, "model_name": model, "warm": warm}
    if quiet:
        results = compare(tr, mf, profiles, policies=names, catalog=catalog, spot=spot, processes=processes, **kw)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            tasks = {n: bar.add_task(n, total=max(tr.duration_s, 1.0)) for n in names}

            def progress(name: str, t: float, duration: float) -> None:
                bar.update(tasks[name], completed=min(t, duration))

            results = compare(tr, mf, profiles, policies=names, catalog=catalog, spot=spot, progress=progress, **kw)
    if report is not None:
        from skyfleet.planner.report import write_report

        write_report(results, report, title=f"skyfleet simulate: {tr.name} on {fleet.name} ({model})")
    if format_ == "json":
        typer.echo(json.dumps({k: r.to_json() for k, r in results.items()}, allow_nan=False))
    else:
        _table(results)
        if report is not None:
            typer.echo(f"report: {report / 'index.html'}")
