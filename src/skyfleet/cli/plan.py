"""skyfleet plan: the cheapest fleet that serves a trace at an SLO, written as a fleet spec.

Reads a trace (:func:`skyfleet.planner.traces.load_trace`), optionally sliced and rate-scaled, the instance
catalog and the engine profiles; prints the replica mix per window with its cost, the instance types that
cannot meet the SLO (with the best TTFT/TPOT they reach), and writes the fleet spec (``--out``), which
``skyfleet.fleet.spec.load_fleet_spec`` loads unchanged. Exit 2: bad arguments, an unreadable trace or
profile file, or an SLO that no instance type meets.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from skyfleet.cost.catalog import Catalog
    from skyfleet.planner.milp import Option, Plan, WindowDemand
    from skyfleet.planner.types import Trace

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_FORMATS = ("table", "json")


def parse_duration(text: str, hint: str) -> float:
    """Seconds from ``900``, ``900s``, ``15m``, ``1.5h`` or ``1d``; :class:`typer.BadParameter` otherwise."""
    m = _DURATION.match(text)
    if not m:
        raise typer.BadParameter(f"'{text}' is not a duration (use e.g. 900, 900s, 15m, 1h)", param_hint=hint)
    return float(m.group(1)) * _UNIT_S[m.group(2) or "s"]


def parse_slice(text: str) -> tuple[float, float]:
    """``START:END`` in seconds from the trace's start (durations allowed, END may be empty for the rest)."""
    start, sep, end = text.partition(":")
    if not sep:
        raise typer.BadParameter(f"'{text}' is not START:END (e.g. 0:3600, 10m:40m, 1800:)", param_hint="--slice")
    lo = parse_duration(start, "--slice") if start.strip() else 0.0
    hi = parse_duration(end, "--slice") if end.strip() else math.inf
    if hi <= lo:
        raise typer.BadParameter(f"'{text}': END must be after START", param_hint="--slice")
    return lo, hi


@dataclass(frozen=True)
class PlanResult:
    trace: Trace
    demands: list[WindowDemand]
    options: list[Option]
    infeasible: list[str]
    plan: Plan
    spec: dict[str, Any]
    single_best: tuple[str, float] | None  # the cheapest plan with one option only: (label, $)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"skyfleet plan: {message}", err=True)
    return typer.Exit(code)


def _profiles(path: Path | None) -> Any:
    from skyfleet.planner.profiles import ProfileBook

    return ProfileBook.builtin() if path is None else ProfileBook.load(path)


def build_plan(*, trace: Trace, model: str, ttft_p95: float, tpot_p95: float, catalog: Catalog, profiles: Any,
               regions: list[str] | None, engine: str, on_demand_floor: int, window_s: float, peak_s: float,
               headroom: float, max_headroom: float, spot_max_fraction: float | None, time_limit_s: float,
               tiers: tuple[str, ...], lead_s: float | None = None) -> PlanResult:
    """Trace in, plan and fleet spec out (raises PlanError when nothing meets the SLO).

    ``lead_s``: how much earlier a scale-up window's schedule fires; None: the longest cold start of the
    replicas the plan uses."""
    import numpy as np

    from skyfleet.fleet.spec import Slo
    from skyfleet.planner.milp import (
        PlanError,
        demand_windows,
        options_for,
        plan_to_fleet_spec,
        single_option_cost,
        solve,
    )

    if len(trace) == 0:
        raise PlanError("the trace has no request (check --slice)")
    slo = Slo(ttft_p95_s=ttft_p95, tpot_p95_s=tpot_p95)
    demands = demand_windows(trace, window_s, peak_s=peak_s)
    options, infeasible = options_for(
        model, slo, catalog, profiles, regions=regions, engine=engine,
        mean_prompt_tokens=float(np.mean(trace.prompt_tokens)),
        mean_output_tokens=float(np.mean(trace.output_tokens)),
        p95_prompt_tokens=float(np.percentile(trace.prompt_tokens, 95)), tiers=tiers)  # type: ignore[arg-type]
    if not options:
        where = f" in {', '.join(regions)}" if regions else ""
        if not infeasible:
            raise PlanError(f"no instance type{where} has an engine profile for {model} on {engine}")
        raise PlanError(f"no instance type{where} meets the SLO (TTFT p95 {ttft_p95:g} s, TPOT p95 "
                        f"{tpot_p95:g} s) for {model} on {engine}; best achievable per type:\n  "
                        + "\n  ".join(infeasible))
    plan = solve(demands, options, on_demand_floor=on_demand_floor, headroom=headroom,
                 spot_max_fraction=spot_max_fraction, time_limit_s=time_limit_s)
    if not plan.ok:
        raise PlanError("no feasible plan: " + "; ".join(plan.notes))
    if lead_s is None:
        lead_s = max((options[i].profile.cold_start_s for i in plan.used()), default=0.0)
    spec = plan_to_fleet_spec(plan, options, demands, model=model, slo=slo, engine=engine,
                              start_epoch=trace.start_epoch, on_demand_floor=on_demand_floor,
                              max_headroom=max_headroom, lead_s=lead_s)
    singles = [(o.label, single_option_cost(demands, o, on_demand_floor=on_demand_floor, headroom=headroom))
               for o in options if spot_max_fraction is None or o.tier == "on-demand"]
    finite = [s for s in singles if math.isfinite(s[1])]
    return PlanResult(trace, demands, options, infeasible, plan, spec,
                      min(finite, key=lambda s: s[1]) if finite else None)


def plan(
    trace: Annotated[str, typer.Option("--trace", help="Trace: a file (.csv Azure, .csv.gz/.jsonl Mooncake) or "
                                       "azure:PATH, mooncake:PATH, usage:DATABASE_URL.")],
    model: Annotated[str, typer.Option(help="Model name, as in the engine profiles (e.g. llama-3.1-8b).")],
    ttft_p95: Annotated[float, typer.Option("--ttft-p95", help="SLO: 95th percentile time to first token, s.")],
    tpot_p95: Annotated[float, typer.Option("--tpot-p95", help="SLO: 95th percentile time per output token, s.")],
    region: Annotated[list[str] | None, typer.Option(help="Only these regions (repeat the option).")] = None,
    engine: Annotated[str, typer.Option(help="Engine: vllm, sglang or llama.")] = "vllm",
    on_demand_floor: Annotated[int, typer.Option(help="At least this many on-demand replicas at all times.")] = 0,
    window: Annotated[str, typer.Option(help="Planning window (900, 900s, 15m, 1h).")] = "15m",
    peak: Annotated[str, typer.Option(help="A window is sized for its busiest interval of this length.")] = "1m",
    rate: Annotated[float, typer.Option(help="Scale the trace's request rate by this factor.")] = 1.0,
    slice_: Annotated[str | None, typer.Option("--slice", help="Only START:END of the trace (s or 15m...).")] = None,
    profiles: Annotated[Path | None, typer.Option(help="Engine profiles file (default: the built-in ones).")] = None,
    headroom: Annotated[float, typer.Option(help="Size for demand x this factor.")] = 1.0,
    max_headroom: Annotated[float, typer.Option(help="Pool and schedule max = planned count x this factor.")] = 1.25,
    spot_max_fraction: Annotated[float | None, typer.Option(help="At most this share of capacity on spot.")] = None,
    no_spot: Annotated[bool, typer.Option("--no-spot", help="Plan on-demand capacity only.")] = False,
    lead: Annotated[str, typer.Option(help="Start a scale-up window's schedule this much earlier (auto: the "
                                      "replicas' cold start).")] = "auto",
    time_limit: Annotated[float, typer.Option(help="MILP time limit, seconds.")] = 10.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the fleet spec YAML here.")] = None,
    format: Annotated[str, typer.Option("--format", help="Output: table or json.")] = "table",
) -> None:
    """Plan the cheapest fleet that serves a trace at an SLO, per time window, and write its fleet spec."""
    from skyfleet.config import ConfigError
    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.spec import parse_fleet_spec
    from skyfleet.planner.milp import PlanError
    from skyfleet.planner.traces import load_trace, scale, time_slice

    if format not in _FORMATS:
        raise typer.BadParameter(f"'{format}' is not one of {', '.join(_FORMATS)}", param_hint="--format")
    window_s = parse_duration(window, "--window")
    peak_s = parse_duration(peak, "--peak")
    if window_s <= 0:
        raise typer.BadParameter("the window must be longer than 0 s", param_hint="--window")
    if peak_s <= 0:
        raise typer.BadParameter("the peak interval must be longer than 0 s", param_hint="--peak")
    span = parse_slice(slice_) if slice_ is not None else None
    lead_s = None if lead.strip().lower() == "auto" else parse_duration(lead, "--lead")
    for value, hint in ((ttft_p95, "--ttft-p95"), (tpot_p95, "--tpot-p95"), (rate, "--rate")):
        if not (value > 0 and math.isfinite(value)):
            raise typer.BadParameter(f"must be a positive number, not {value}", param_hint=hint)
    if on_demand_floor < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--on-demand-floor")
    if max_headroom < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--max-headroom")

    catalog = Catalog.builtin()
    try:
        loaded = load_trace(trace)
        if span is not None:
            loaded = time_slice(loaded, *span)
        if rate != 1.0:
            loaded = scale(loaded, rate)
        book = _profiles(profiles)
        result = build_plan(trace=loaded, model=model, ttft_p95=ttft_p95, tpot_p95=tpot_p95, catalog=catalog,
                            profiles=book, regions=region, engine=engine, on_demand_floor=on_demand_floor,
                            window_s=window_s, peak_s=peak_s, headroom=headroom, max_headroom=max_headroom,
                            spot_max_fraction=spot_max_fraction, time_limit_s=time_limit,
                            tiers=("on-demand",) if no_spot else ("spot", "on-demand"), lead_s=lead_s)
        parse_fleet_spec(result.spec, catalog, source="planned fleet spec")  # what load_fleet_spec will see
    except (ConfigError, PlanError, OSError) as exc:
        raise _fail(str(exc)) from None

    if out is not None:
        import yaml

        header = (f"# skyfleet plan: {model}, trace {loaded.name}, {len(loaded)} requests, "
                  f"window {window_s:g} s; ${result.plan.cost_usd:.2f} over the trace\n")
        try:
            out.write_text(header + yaml.safe_dump(result.spec, sort_keys=False))
        except OSError as exc:
            raise _fail(f"cannot write {out}: {exc.strerror}", 1) from None
    if format == "json":
        from skyfleet.cli.common import echo_json

        echo_json(_json(result, out))
    else:
        _table(result, out)


def _when(trace: Trace, start_s: float) -> str:
    if trace.start_epoch is None:
        return f"+{start_s:,.0f} s"
    return datetime.fromtimestamp(trace.start_epoch + start_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _mix(result: PlanResult, w: int) -> str:
    counts = result.plan.counts[w]
    return ", ".join(f"{n}x {result.options[i].label}" for i, n in sorted(counts.items())) or "-"


def _json(result: PlanResult, out: Path | None) -> dict[str, Any]:
    p, opts = result.plan, result.options
    return {
        "trace": {"name": result.trace.name, "requests": len(result.trace), "start_epoch": result.trace.start_epoch,
                  "duration_s": result.trace.duration_s},
        "status": p.status, "cost_usd": p.cost_usd, "gpu_hours": p.gpu_hours, "solve_s": p.solve_s,
        "single_option_best": (None if result.single_best is None
                               else {"option": result.single_best[0], "cost_usd": result.single_best[1]}),
        "windows": [{
            "start_s": d.start_s, "end_s": d.end_s, "requests": d.requests, "peak_requests_per_s": d.requests_per_s,
            "peak_output_tokens_per_s": d.output_tokens_per_s, "peak_prompt_tokens_per_s": d.prompt_tokens_per_s,
            "replicas": {opts[i].label: n for i, n in sorted(p.counts[w].items())},
            "cost_usd": p.window_cost_usd[w], "status": p.window_status[w]}
            for w, d in enumerate(result.demands)],
        "options": [{
            "instance_type": o.instance_type, "region": o.region, "tier": o.tier, "usd_per_hour": o.usd_per_hour,
            "gpu": o.profile.gpu, "gpus": o.profile.gpus, "max_batch": o.capacity.max_batch,
            "requests_per_s": o.capacity.requests_per_s, "output_tokens_per_s": o.capacity.output_tokens_per_s,
            "ttft_s": o.capacity.ttft_s, "tpot_s": o.capacity.tpot_s, "limit": o.capacity.limit,
            "profile_source": o.profile.source, "used": i in p.used()} for i, o in enumerate(opts)],
        "infeasible": result.infeasible,
        "fleet_spec": result.spec,
        "written_to": str(out) if out is not None else None,
    }


def _table(result: PlanResult, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=max(Console().width, 120))
    p, opts, tr = result.plan, result.options, result.trace
    used = p.used()

    options = Table(title="Replica options used (capacity at the SLO)", title_justify="left")
    for name in ("option", "GPU", "$/h", "batch", "req/s", "tok/s", "TTFT", "TPOT", "bound", "$/M tok"):
        options.add_column(name, justify="left" if name in ("option", "GPU", "bound") else "right")
    for i in used:
        o, c = opts[i], opts[i].capacity
        options.add_row(o.label, f"{o.profile.gpus}x {o.profile.gpu}", f"{o.usd_per_hour:.3f}", str(c.max_batch),
                        f"{c.requests_per_s:.2f}", f"{c.output_tokens_per_s:,.0f}", f"{c.ttft_s:.3f}",
                        f"{c.tpot_s:.4f}", c.limit, f"{o.usd_per_million_tokens:.3f}")
    console.print(options)

    windows = Table(title=f"Plan per window ({tr.name}, {len(tr):,} requests)", title_justify="left")
    for name in ("window start (UTC)" if tr.start_epoch is not None else "window start", "requests",
                 "peak req/s", "peak out tok/s", "replicas", "mix", "cost"):
        windows.add_column(name, justify="left" if name in ("mix",) or name.startswith("window") else "right")
    for w, d in enumerate(result.demands):
        windows.add_row(_when(tr, d.start_s), f"{d.requests:,}", f"{d.requests_per_s:.2f}",
                        f"{d.output_tokens_per_s:,.0f}", str(p.replicas(w)), _mix(result, w),
                        f"${p.window_cost_usd[w]:,.4f}")
    windows.add_section()
    windows.add_row("total", f"{sum(d.requests for d in result.demands):,}", "", "",
                    str(max(p.replicas(w) for w in range(len(result.demands)))) + " peak", "",
                    f"${p.cost_usd:,.4f}", style="bold")
    console.print(windows)

    lines = [f"Total ${p.cost_usd:,.4f}, {p.gpu_hours:,.2f} GPU-hours; solver {p.status} in {p.solve_s:.2f} s "
             f"({len(opts)} options, {len(result.demands)} windows)."]
    if result.single_best is not None and result.single_best[1] > 0:
        label, cost = result.single_best
        lines.append(f"Cheapest single option: {label}, ${cost:,.4f} "
                     f"(the mix saves {1 - p.cost_usd / cost:.1%}).")
    if result.infeasible:
        lines.append("Cannot meet the SLO (best achievable):")
        lines.extend(f"  {line}" for line in result.infeasible)
    lines.append(f"Fleet spec written to {out}." if out is not None else "Fleet spec not written (use --out).")
    for line in lines:
        console.print(line, highlight=False, markup=False)
