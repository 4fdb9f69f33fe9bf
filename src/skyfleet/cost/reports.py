"""Cost reports: usage and cost over a window, by tenant, model, key, pool or instance type.

Pure aggregation over what :mod:`skyfleet.state.cost_queries` reads (a :class:`CostWindow`), with the
metering's attribution (:func:`skyfleet.cost.attribution.attribute`) splitting each replica's cost
over the requests it served. For each group a report shows:

* ``requests`` and ``prompt/cached/completion`` tokens: the group's usage records that *ended* in
  the window;
* ``charged_usd``: what those requests were charged at settlement (``usage_records.charged_usd_micros``,
  the figure budgets count);
* ``attributed_usd``: the group's share of the replica cost *incurred* in the window (a request
  that straddles an edge brings only its part inside the window);
* ``share``: the group's part of everything attributed in the report.

And, unless the report is scoped to one tenant, the idle cost (replica time that served no
request) per pool and per replica, and the conservation check: attributed + idle = the total
replica cost of the window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from skyfleet.cost.attribution import Attribution, IntervalCost, UsageSlice, attribute, replica_key
from skyfleet.cost.pricing import TokenPrices, TokenWeights
from skyfleet.state.cost_queries import CostWindow, IntervalRow, UsageRow

DIMENSIONS = ("tenant", "model", "key", "pool", "instance-type")
FORMATS = ("table", "csv", "json")
#: The longest window a report covers.
MAX_WINDOW = timedelta(days=400)
#: Attributed + idle must equal the replica cost within this relative error (the attribution's promise).
CONSERVATION_TOLERANCE = 1e-3
#: The group of usage that no replica interval covers (API-priced pools, or a replica no gateway recorded).
UNMETERED = "(unmetered)"

_AGE_RE = re.compile(r"(\d{1,6})([smhdw])", re.ASCII)
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TIME_HELP = "an age (30m, 24h, 7d, 2w) or an ISO 8601 date or time (2026-11-01, 2026-11-01T12:00:00Z)"


class WindowError(ValueError):
    """A window that cannot be reported on; the message says why, for people."""


def parse_time(text: str, now: datetime, *, name: str = "since") -> datetime:
    """An age before ``now`` (``30m``, ``24h``, ``7d``, ``2w``) or an ISO 8601 date/time (UTC if no zone)."""
    raw = text.strip()
    try:
        if m := _AGE_RE.fullmatch(raw):
            return now - timedelta(**{_AGE_UNITS[m.group(2)]: int(m.group(1))})
        at = datetime.fromisoformat(raw)
    except (ValueError, OverflowError):
        raise WindowError(f"'{name}' must be {_TIME_HELP}; got '{raw[:40]}'") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def parse_window(since: str, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    """``[since, until)`` (``until`` defaults to now, and is capped at now). Raises :class:`WindowError`."""
    start = parse_time(since, now, name="since")
    end = min(parse_time(until, now, name="until"), now) if until is not None else now
    if start >= now:
        raise WindowError(f"'since' ({start:%Y-%m-%d %H:%M:%S} UTC) is not in the past")
    if start >= end:
        raise WindowError("the window is empty: 'since' must be before 'until'")
    if end - start > MAX_WINDOW:
        raise WindowError(f"the window is longer than {MAX_WINDOW.days} days; report on a shorter one")
    return start, end


@dataclass(frozen=True, slots=True)
class ReportRow:
    group: str
    #: What people call the group (a tenant's or key's name), or the group itself.
    name: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    charged_usd: float
    attributed_usd: float
    share: float

    def json(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens, "charged_usd": round(self.charged_usd, 6),
                "attributed_usd": round(self.attributed_usd, 6), "share": round(self.share, 6)}


@dataclass(frozen=True, slots=True)
class IdleRow:
    pool: str
    #: ``owner/replica_id``; None on a pool's row.
    replica: str | None
    instance_type: str | None
    cost_usd: float
    idle_usd: float

    @property
    def idle_share(self) -> float:
        return self.idle_usd / self.cost_usd if self.cost_usd > 0 else 0.0

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pool": self.pool}
        if self.replica is not None:
            out |= {"replica": self.replica, "instance_type": self.instance_type}
        return out | {"cost_usd": round(self.cost_usd, 6), "idle_usd": round(self.idle_usd, 6),
                      "idle_share": round(self.idle_share, 6)}


@dataclass(frozen=True, slots=True)
class CostReport:
    by: str
    start: datetime
    end: datetime
    rows: tuple[ReportRow, ...]
    #: Empty when the report is scoped to tenants (a tenant sees its own usage, not the fleet's).
    idle_pools: tuple[IdleRow, ...]
    idle_replicas: tuple[IdleRow, ...]
    #: Total replica cost of the window, and everything attributed / idle in it (fleet-wide);
    #: None when scoped.
    replica_cost_usd: float | None
    attributed_total_usd: float | None
    idle_total_usd: float | None
    #: API-priced usage (per-token tables), apart from the replica cost; requests nothing priced.
    api_usd: float = 0.0
    unpriced_requests: int = 0

    @property
    def scoped(self) -> bool:
        return self.replica_cost_usd is None

    @property
    def conservation_error(self) -> float | None:
        """|attributed + idle - replica cost| / replica cost (0 when there was no cost)."""
        if self.replica_cost_usd is None or self.attributed_total_usd is None or self.idle_total_usd is None:
            return None
        gap = abs(self.attributed_total_usd + self.idle_total_usd - self.replica_cost_usd)
        return gap / self.replica_cost_usd if self.replica_cost_usd > 0 else gap

    @property
    def conserved(self) -> bool | None:
        err = self.conservation_error
        return None if err is None else err <= CONSERVATION_TOLERANCE

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": sum(r.requests for r in self.rows),
            "prompt_tokens": sum(r.prompt_tokens for r in self.rows),
            "cached_tokens": sum(r.cached_tokens for r in self.rows),
            "completion_tokens": sum(r.completion_tokens for r in self.rows),
            "charged_usd": round(sum(r.charged_usd for r in self.rows), 6),
            "attributed_usd": round(sum(r.attributed_usd for r in self.rows), 6),
        }
        if not self.scoped:
            assert self.replica_cost_usd is not None and self.idle_total_usd is not None
            out |= {"idle_usd": round(self.idle_total_usd, 6), "replica_cost_usd": round(self.replica_cost_usd, 6),
                    "api_usd": round(self.api_usd, 6), "unpriced_requests": self.unpriced_requests,
                    "conservation_error": self.conservation_error, "conserved": self.conserved}
        return out

    def named(self, names: Mapping[str, str]) -> CostReport:
        """The same report with groups named (tenant or key names); unnamed groups keep their id."""
        return replace(self, rows=tuple(replace(r, name=names.get(r.group, r.name)) for r in self.rows))

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"object": "cost_report", "by": self.by, "since": self.start.isoformat(),
                               "until": self.end.isoformat(), "rows": [r.json() for r in self.rows],
                               "totals": self.totals()}
        if not self.scoped:
            out["idle"] = {"pools": [r.json() for r in self.idle_pools],
                           "replicas": [r.json() for r in self.idle_replicas]}
        return out


# -- from rows to the attribution's inputs --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttributionInput:
    intervals: tuple[IntervalCost, ...]
    usage: tuple[UsageSlice, ...]
    #: request id -> the interval that served it (None: no interval covers it).
    served_by: Mapping[str, IntervalRow | None]


def attribution_input(window: CostWindow) -> AttributionInput:
    """The window's rows as the attribution's inputs (:class:`IntervalCost`, :class:`UsageSlice`).

    Each request goes to the interval that served it (:meth:`CostWindow.served_by`: on (owner,
    replica id) when the record names its gateway, a guess by replica id and time for older ones).
    """
    served_by = window.served_by()
    intervals = tuple(IntervalCost(owner=iv.owner, replica_id=iv.replica_id, pool=iv.pool,
                                   usd_per_hour=iv.usd_per_hour, start=iv.started_at, end=iv.end_at(window.now))
                      for iv in window.intervals)
    usage: list[UsageSlice] = []
    for u in window.usage:
        iv = served_by[u.request_id]
        usage.append(UsageSlice(
            request_id=u.request_id, owner=iv.owner if iv is not None else "", replica_id=u.replica_id or "",
            tenant_id=u.tenant_id, key_id=u.key_id, model=u.model, pool=u.pool or "", start=u.started_at,
            end=u.ended_at, prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens))
    return AttributionInput(intervals=intervals, usage=tuple(usage), served_by=served_by)


def _group_of(by: str, u: UsageRow, served: IntervalRow | None) -> str:
    if by == "tenant":
        return u.tenant_id
    if by == "model":
        return u.model
    if by == "key":
        return u.key_id
    if by == "pool":
        return u.pool or UNMETERED
    if served is None:
        return UNMETERED
    return served.instance_type or served.tier


def _overlap_s(a0: datetime, a1: datetime, b0: datetime, b1: datetime) -> float:
    return max(0.0, (min(a1, b1) - max(a0, b0)).total_seconds())


def build_report(window: CostWindow, *, by: str, weights: TokenWeights,
                 token_prices: Mapping[str, TokenPrices] | None = None,
                 names: Mapping[str, str] | None = None,
                 tenant_ids: Collection[str] | None = None) -> CostReport:
    """The report of ``window`` grouped ``by`` one of :data:`DIMENSIONS`.

    ``names``: group -> display name (tenant and key names). ``tenant_ids``: scope the report to
    these tenants' usage (their rows only, no fleet-wide idle or totals); None: the whole fleet.
    The attribution always runs over every request in the window, whoever sent it; ``token_prices``
    (by model) prices requests no replica interval covers (API-priced upstreams).
    """
    if by not in DIMENSIONS:
        raise ValueError(f"'by' must be one of {', '.join(DIMENSIONS)}")
    names = names or {}
    inputs = attribution_input(window)
    result = attribute(inputs.intervals, inputs.usage, start=window.start, end=window.end, weights=weights,
                       token_prices=token_prices)
    groups: dict[str, list[float]] = {}  # group -> [requests, prompt, cached, completion, charged, attributed]
    for u in window.usage:
        if tenant_ids is not None and u.tenant_id not in tenant_ids:
            continue
        acc = groups.setdefault(_group_of(by, u, inputs.served_by[u.request_id]), [0, 0, 0, 0, 0.0, 0.0])
        if window.start <= u.ended_at < window.end:
            acc[0] += 1
            acc[1] += u.prompt_tokens
            acc[2] += u.cached_tokens
            acc[3] += u.completion_tokens
            acc[4] += u.charged_usd_micros / 1e6
        acc[5] += result.by_request.get(u.request_id, 0.0) + result.api_by_request.get(u.request_id, 0.0)
    attributed_sum = sum(acc[5] for acc in groups.values())
    rows = tuple(sorted(
        (ReportRow(group=g, name=names.get(g, g), requests=int(a[0]), prompt_tokens=int(a[1]),
                   cached_tokens=int(a[2]), completion_tokens=int(a[3]), charged_usd=a[4], attributed_usd=a[5],
                   share=a[5] / attributed_sum if attributed_sum > 0 else 0.0)
         for g, a in groups.items()),
        key=lambda r: (-r.attributed_usd, -r.charged_usd, r.group)))
    if tenant_ids is not None:
        return CostReport(by=by, start=window.start, end=window.end, rows=rows, idle_pools=(), idle_replicas=(),
                          replica_cost_usd=None, attributed_total_usd=None, idle_total_usd=None)
    return _with_idle(window, by, rows, result)


def _with_idle(window: CostWindow, by: str, rows: tuple[ReportRow, ...], result: Attribution) -> CostReport:
    cost_by_replica: dict[tuple[str, str], float] = {}
    meta: dict[tuple[str, str], IntervalRow] = {}
    for iv in window.intervals:
        key = (iv.owner, iv.replica_id)
        hours = _overlap_s(iv.started_at, iv.end_at(window.now), window.start, window.end) / 3600
        cost_by_replica[key] = cost_by_replica.get(key, 0.0) + iv.usd_per_hour * hours
        meta[key] = iv
    replicas = tuple(sorted(
        (IdleRow(pool=meta[k].pool, replica=replica_key(*k), instance_type=meta[k].instance_type or meta[k].tier,
                 cost_usd=cost, idle_usd=result.idle_by_replica.get(replica_key(*k), 0.0))
         for k, cost in cost_by_replica.items()),
        key=lambda r: (r.pool, r.replica or "")))
    pools: dict[str, list[float]] = {}
    for r in replicas:
        acc = pools.setdefault(r.pool, [0.0, 0.0])
        acc[0] += r.cost_usd
        acc[1] += r.idle_usd
    pool_rows = tuple(IdleRow(pool=p, replica=None, instance_type=None, cost_usd=c, idle_usd=i)
                      for p, (c, i) in sorted(pools.items()))
    replica_cost = sum(r.cost_usd for r in replicas)
    idle_total = sum(r.idle_usd for r in replicas)
    return CostReport(by=by, start=window.start, end=window.end, rows=rows, idle_pools=pool_rows,
                      idle_replicas=replicas, replica_cost_usd=replica_cost, attributed_total_usd=result.attributed,
                      idle_total_usd=idle_total, api_usd=math.fsum(result.api_by_request.values()),
                      unpriced_requests=len(result.unpriced))


def idle_by_pool(report: CostReport) -> dict[str, tuple[float, float]]:
    """pool -> (idle USD, cost USD), for the right-sizing advice."""
    return {r.pool: (r.idle_usd, r.cost_usd) for r in report.idle_pools}


def csv_rows(report: CostReport) -> Iterable[list[str]]:
    """The report as CSV: a header, one row per group, then (fleet-wide reports) one ``(idle)`` row per pool
    whose ``name`` is the pool. Money in USD with 6 decimals; ``share`` as a fraction."""
    yield [report.by, "name", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "charged_usd",
           "attributed_usd", "idle_usd", "share"]
    for r in report.rows:
        yield [r.group, r.name, str(r.requests), str(r.prompt_tokens), str(r.cached_tokens),
               str(r.completion_tokens), f"{r.charged_usd:.6f}", f"{r.attributed_usd:.6f}", "", f"{r.share:.6f}"]
    for p in report.idle_pools:
        yield ["(idle)", p.pool, "", "", "", "", "", "", f"{p.idle_usd:.6f}", ""]


# -- a chart without a plotting library ------------------------------------------------------------

_SVG_ROW = 22
_SVG_LABEL = 220
_SVG_BAR = 420


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def report_svg(report: CostReport) -> str:
    """A horizontal bar chart of the report (attributed USD per group, then idle USD per pool) as SVG text.

    Self-contained (no scripts, no external references); names are escaped.
    """
    bars = [(r.name if r.name == r.group else f"{r.name} ({r.group})", r.attributed_usd, "#4472c4")
            for r in report.rows]
    bars += [(f"idle: {p.pool}", p.idle_usd, "#a5a5a5") for p in report.idle_pools]
    top = max((v for _, v, _ in bars), default=0.0)
    height = 40 + _SVG_ROW * max(1, len(bars)) + 10
    width = _SVG_LABEL + _SVG_BAR + 110
    title = (f"Attributed cost by {report.by} and idle cost, {report.start:%Y-%m-%d %H:%M} to "
             f"{report.end:%Y-%m-%d %H:%M} UTC")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="20" font-size="13" font-weight="bold">{_xml(title)}</text>']
    if not bars:
        out.append('<text x="8" y="50">no cost in this window</text>')
    for i, (label, value, colour) in enumerate(bars):
        y = 36 + i * _SVG_ROW
        w = 0.0 if top <= 0 else max(1.0, _SVG_BAR * value / top) if value > 0 else 0.0
        out.append(f'<text x="{_SVG_LABEL - 6}" y="{y + 14}" text-anchor="end">{_xml(label[:40])}</text>')
        out.append(f'<rect x="{_SVG_LABEL}" y="{y + 3}" width="{w:.1f}" height="{_SVG_ROW - 6}" fill="{colour}"/>')
        out.append(f'<text x="{_SVG_LABEL + w + 6:.1f}" y="{y + 14}">${value:,.6f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
