"""The simulation report: ``index.html`` (summary table + plots), PNG plots (matplotlib, Agg) and ``summary.json``.

Plots: replicas over time by pool and tier (one per policy), cumulative cost (all policies on one plot),
latency CDFs (TTFT and end-to-end, all policies), SLO attainment per window (all policies). Everything is
written into ``out_dir``; the HTML references the PNGs by relative name, so the folder can be moved whole.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from skyfleet.planner.results import SimResult

__all__ = ["summary_rows", "write_report"]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summary_rows(results: Mapping[str, SimResult]) -> list[dict[str, Any]]:
    """One row per policy: the numbers of the summary table (also ``skyfleet simulate``'s table)."""
    rows = []
    for name, r in results.items():
        rows.append({
            "policy": name, "cost_usd": r.cost_usd, "gpu_hours": r.gpu_hours,
            "slo_attainment": r.attainment.get("both"), "ttft_p95_s": r.latency["ttft_s"]["p95"],
            "tpot_p95_s": r.latency["tpot_s"]["p95"], "e2e_p95_s": r.latency["e2e_s"]["p95"],
            "preemptions": r.preemptions, "retried": r.retried, "dropped": r.dropped, "delayed": r.delayed,
            "spot_usd": r.cost_by_tier.get("spot", 0.0), "on_demand_usd": r.cost_by_tier.get("on-demand", 0.0),
        })
    return rows


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "policy"


def _plots(results: Mapping[str, SimResult], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}

    def save(fig: Any, key: str, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        files[key] = name

    for name, r in results.items():
        s = r.series
        t = np.asarray(s["t_s"], dtype=float) / 60.0
        fig, ax = plt.subplots(figsize=(8, 3.2))
        pools = {p: v for p, v in s["by_pool"].items() if any(v)}
        if pools:
            ax.stackplot(t, *pools.values(), labels=list(pools), step="post", alpha=0.8)
        for tier, style in (("on-demand", "--"), ("spot", ":")):
            if any(s["by_tier"].get(tier, [])):
                ax.step(t, s["by_tier"][tier], where="post", linestyle=style, color="black", label=f"{tier} (tier)")
        ax.set(xlabel="minutes", ylabel="replicas", title=f"{name}: replicas by pool (stacked) and tier")
        ax.legend(fontsize=7, loc="upper left")
        save(fig, f"replicas:{name}", f"replicas-{_slug(name)}.png")

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, r in results.items():
        ax.plot(np.asarray(r.series["t_s"], dtype=float) / 60.0, r.series["cost_usd"], label=name)
    ax.set(xlabel="minutes", ylabel="$ (cumulative)", title="Cumulative cost")
    ax.legend(fontsize=8)
    save(fig, "cost", "cost.png")

    for key, attr, label in (("ttft", "ttft_s", "TTFT (s)"), ("e2e", "e2e_s", "end-to-end latency (s)")):
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for name, r in results.items():
            v = np.sort(np.asarray(getattr(r, attr), dtype=float))
            v = v[np.isfinite(v)]
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name)
        slo = next(iter(results.values())).slo.get("ttft_s") if key == "ttft" and results else None
        if slo:
            ax.axvline(slo, color="grey", linestyle="--", label=f"SLO {slo:g} s")
        ax.set(xscale="log", xlabel=label, ylabel="fraction of requests", title=f"{label} CDF")
        ax.legend(fontsize=8)
        save(fig, key, f"cdf-{key}.png")

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for name, r in results.items():
        ws = [w for w in r.windows if w.get("both") is not None]
        ax.plot([float(w["start_s"]) / 60.0 for w in ws], [w["both"] for w in ws], marker=".", label=name)
    ax.set(xlabel="minutes (window start)", ylabel="SLO attainment", ylim=(0, 1.02), title="SLO attainment per window")
    ax.legend(fontsize=8)
    save(fig, "windows", "slo-windows.png")
    return files


def write_report(results: Mapping[str, SimResult], out_dir: str | Path, *, title: str = "skyfleet simulate",
                 notes: str = "") -> Path:
    """Write ``index.html``, the PNGs and ``summary.json`` into ``out_dir`` (created); returns the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _plots(results, out) if results else {}
    rows = summary_rows(results)
    summary = {"title": title, "notes": notes, "summary": rows,
               "results": {k: r.to_json() for k, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=str))
    e = html.escape
    head = ("<tr><th>policy</th><th>cost $</th><th>on-demand $</th><th>spot $</th><th>GPU-hours</th>"
            "<th>SLO attainment</th><th>TTFT p95 s</th><th>TPOT p95 s</th><th>e2e p95 s</th><th>preemptions</th>"
            "<th>retried</th><th>dropped</th><th>delayed</th></tr>")
    body = "".join(
        f"<tr><td>{e(r['policy'])}</td><td>{r['cost_usd']:.2f}</td><td>{r['on_demand_usd']:.2f}</td>"
        f"<td>{r['spot_usd']:.2f}</td><td>{r['gpu_hours']:.2f}</td>"
        f"<td>{_fmt(None if r['slo_attainment'] is None else 100 * r['slo_attainment'], '.2f')}%</td>"
        f"<td>{_fmt(r['ttft_p95_s'], '.3f')}</td><td>{_fmt(r['tpot_p95_s'], '.4f')}</td>"
        f"<td>{_fmt(r['e2e_p95_s'], '.2f')}</td><td>{r['preemptions']}</td><td>{r['retried']}</td>"
        f"<td>{r['dropped']}</td><td>{r['delayed']}</td></tr>" for r in rows)
    first = next(iter(results.values()), None)
    slo = (f"SLO: TTFT p95 &le; {first.slo['ttft_s']:g} s, TPOT p95 &le; {first.slo['tpot_s']:g} s; trace "
           f"{e(first.trace)}, {first.requests} requests.") if first else ""
    imgs = "".join(f'<figure><img src="{e(f)}" alt="{e(k)}"><figcaption>{e(k)}</figcaption></figure>'
                   for k, f in files.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>"
            f"<h1>{e(title)}</h1><p>{slo}</p>{f'<p>{e(notes)}</p>' if notes else ''}"
            f"<table>{head}{body}</table>{imgs}"
            "<p><a href='summary.json'>summary.json</a></p></body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index
