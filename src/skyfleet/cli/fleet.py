"""skyfleet fleet status|scale|preempt|history: the running gateway's fleet controller, over its admin API.

The controller lives in the gateway process (``skyfleet serve`` with a ``fleet_spec``), so these commands call
``/admin/v1/fleet`` on it: ``--url`` (default ``http://127.0.0.1:8000``, or ``SKYFLEET_URL``) with a key
holding fleet:read (status, history) or fleet:manage (scale, preempt): ``--api-key`` or ``SKYFLEET_API_KEY``.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Annotated, Any

import typer

from skyfleet.cli.common import echo_json

app = typer.Typer(help="The fleet controller: status, manual scaling, simulated preemption, decisions.",
                  no_args_is_help=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="SKYFLEET_URL", help="The gateway's base URL.")]
KeyOption = Annotated[str, typer.Option("--api-key", envvar="SKYFLEET_API_KEY", show_default=False,
                                        help="A key with fleet:read (or fleet:manage to change things).")]
FormatOption = Annotated[str, typer.Option("--format", help="table or json.")]
_DEFAULT_URL = "http://127.0.0.1:8000"


def _call(url: str, key: str, method: str, path: str, body: dict[str, Any] | None = None,
          timeout_s: float = 30.0) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ssl.create_default_context()) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read()).get("error", {})
            message = f"{err.get('message')} ({err.get('code') or exc.code})"
        except (ValueError, AttributeError):
            message = f"HTTP {exc.code}"
        typer.echo(f"skyfleet: {message}", err=True)
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        typer.echo(f"skyfleet: cannot reach the gateway at {url}: {reason}", err=True)
        raise typer.Exit(1) from None


def _format(value: str) -> str:
    if value not in ("table", "json"):
        raise typer.BadParameter(f"'{value}' is not one of table, json", param_hint="--format")
    return value


@app.command("status")
def status(url: UrlOption = _DEFAULT_URL, api_key: KeyOption = "", fmt: FormatOption = "table") -> None:
    """Pools and replicas: tier, state, $/hour, load, cold starts, provider errors."""
    fmt = _format(fmt)
    data = _call(url, api_key, "GET", "/admin/v1/fleet")
    if fmt == "json":
        echo_json(data)
        return
    if not data.get("controller"):
        typer.echo("no fleet controller on this gateway (set fleet_spec)")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for m in data["models"]:
        console.print(f"[bold]{m['model']}[/] policy {m['policy']}, ${m['usd_per_hour']:.4f}/h, "
                      f"queued {m['queued']}: {m['reason'] or 'no decision yet'}")
        table = Table("pool", "tier", "type", "desired", "ready", "$/h", "cold start", "errors", "replicas")
        for p in m["pools"]:
            reps = ", ".join(f"{r['id']} {r['state']} ({r['outstanding']} in flight)" for r in p["replicas"])
            cold = p["cold_start_s"]["last"]
            errors = (f"{p['failures']} ({p['last_error']}; retry in {p['retry_in_s']} s)" if p["failures"]
                      else "-")
            desired = f"{p['desired']}" + (f" (pinned {p['pinned']})" if p["pinned"] is not None else "")
            table.add_row(p["pool"], p["tier"], f"{p['instance_type']}/{p['region']}", desired, str(p["ready"]),
                          f"{p['usd_per_hour']:.4f}", "-" if cold is None else f"{cold:.1f} s", errors, reps or "-")
        console.print(table)


@app.command("scale")
def scale(
    target: Annotated[str, typer.Argument(help="MODEL/POOL")],
    replicas: Annotated[int | None, typer.Argument(help="Pin the pool to this many replicas.")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Release the pool to the policy again.")] = False,
    url: UrlOption = _DEFAULT_URL, api_key: KeyOption = "",
) -> None:
    """Pin a pool to N replicas (the policy keeps it there) or release it with --auto."""
    model, sep, pool = target.rpartition("/")
    if not sep or not model or not pool:
        raise typer.BadParameter("expected MODEL/POOL", param_hint="TARGET")
    if (replicas is None) == (not auto):
        raise typer.BadParameter("give a number of replicas, or --auto", param_hint="REPLICAS")
    out = _call(url, api_key, "POST", "/admin/v1/fleet/scale",
                {"model": model, "pool": pool, "replicas": None if auto else replicas})
    typer.echo(f"{model}/{pool}: " + (f"pinned to {out['pinned']}" if out["pinned"] is not None
                                      else "released to the policy"))


@app.command("preempt")
def preempt(
    replica: Annotated[str, typer.Argument(help="The replica's id (see `skyfleet fleet status`).")],
    notice: Annotated[float, typer.Option("--notice", min=0.001, help="Seconds until it is gone.")] = 120.0,
    capacity_gone: Annotated[float, typer.Option(
        "--capacity-gone", min=0.0, help="Seconds the pool cannot start a replacement (no spot capacity).")] = 0.0,
    url: UrlOption = _DEFAULT_URL, api_key: KeyOption = "",
) -> None:
    """Simulate a spot preemption of a local replica."""
    out = _call(url, api_key, "POST", "/admin/v1/fleet/preempt",
                {"replica": replica, "notice_s": notice, "capacity_gone_s": capacity_gone})
    typer.echo(f"{out['replica']} ({out['pool']}) preempted: gone by {out['deadline']}")


@app.command("history")
def history(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's decisions.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    url: UrlOption = _DEFAULT_URL, api_key: KeyOption = "", fmt: FormatOption = "table",
) -> None:
    """Recorded decisions with their inputs, newest first."""
    fmt = _format(fmt)
    q = f"?limit={limit}" + (f"&model={urllib.request.quote(model)}" if model else "")
    data = _call(url, api_key, "GET", "/admin/v1/fleet/history" + q)
    if fmt == "json":
        echo_json(data)
        return
    for d in data["data"]:
        desired = d["decision"].get("desired")
        counts = " ".join(f"{k}={v}" for k, v in desired.items()) if isinstance(desired, dict) else ""
        typer.echo(f"{d['id']:>6} {d['at']} {d['model']} {counts} :: {d['reason']}")
