"""Attribution: a replica's cost over a window, split across the requests it served, and idle.

Pure: a function of replica cost intervals, usage slices, the window and the token weights.

Within ``[start, end]``, each replica interval costs ``usd_per_hour x hours`` (clipped to the
window). At every moment the interval's cost rate goes

* to the requests in flight on that replica at that moment (*busy* time), in proportion to their
  token-weight density: a request's weighted tokens (:class:`~skyfleet.cost.pricing.TokenWeights`)
  spread uniformly over its duration ``[start, end]``, so a request with twice the weighted tokens
  per second of another gets twice its share of the moments they share (if every request in
  flight weighs 0, e.g. failed before any token, they share equally);
* to *idle* when no request is in flight on it.

So ``sum(by_request) + sum(idle_by_replica) == sum(total_by_replica)`` (conservation, up to float
rounding: each moment's cost is split exactly, and sums use :func:`math.fsum`). A request counts
only where its replica (``owner``, ``replica_id``) has an interval at the same time; requests that
no interval covers (API-priced pools, whose provider charges per token) are priced by the
per-token table (``token_prices``, by model) and reported separately (``api_by_request``); those
without a price either are listed in ``unpriced``.

Attributed cost is what the fleet actually cost, shared out after the fact; charged cost
(``usage_records.charged_usd_micros``) is the price fixed at settlement from nominal throughput.
They differ: a busy fleet attributes less per token than it charges, an idle one more (and has
idle cost). Reports show both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from skyfleet.cost.pricing import TokenPrices, TokenWeights


@dataclass(frozen=True, slots=True)
class IntervalCost:
    """A replica's life at one price: ``usd_per_hour`` from ``start`` to ``end``."""

    owner: str
    replica_id: str
    pool: str
    usd_per_hour: float
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class UsageSlice:
    """One request, as the attribution sees it (no text: ids, tokens and times)."""

    request_id: str
    owner: str
    replica_id: str
    tenant_id: str
    key_id: str
    model: str
    pool: str
    start: datetime
    end: datetime
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class AttributionRow:
    """One line of an attribution: a request's share, a replica's idle cost, or an API-priced request."""

    kind: str  # request | idle | api
    usd: float
    pool: str
    replica: str | None  # "owner/replica_id" (request and idle rows)
    request_id: str | None = None
    tenant_id: str | None = None
    key_id: str | None = None
    model: str | None = None


def replica_key(owner: str, replica_id: str) -> str:
    """How replicas are keyed in an :class:`Attribution` (local ids repeat across gateways)."""
    return f"{owner}/{replica_id}"


@dataclass(slots=True)
class Attribution:
    """USD amounts over the window; replicas keyed ``"owner/replica_id"`` (:func:`replica_key`)."""

    start: datetime
    end: datetime
    by_request: dict[str, float] = field(default_factory=dict)
    idle_by_replica: dict[str, float] = field(default_factory=dict)
    idle_by_pool: dict[str, float] = field(default_factory=dict)
    total_by_replica: dict[str, float] = field(default_factory=dict)
    #: Requests no interval covers but a per-token price (API-priced pools): their cost, apart.
    api_by_request: dict[str, float] = field(default_factory=dict)
    #: Requests no interval covers and no per-token price prices.
    unpriced: tuple[str, ...] = ()
    _slices: dict[str, UsageSlice] = field(default_factory=dict, repr=False)
    _pools: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def total(self) -> float:
        return math.fsum(self.total_by_replica.values())

    @property
    def attributed(self) -> float:
        return math.fsum(self.by_request.values())

    @property
    def idle(self) -> float:
        return math.fsum(self.idle_by_replica.values())

    def by(self, dimension: str) -> dict[str, float]:
        """Attributed USD (interval-priced and API-priced) grouped by tenant, key, model or pool."""
        attr = {"tenant": "tenant_id", "key": "key_id", "model": "model", "pool": "pool"}[dimension]
        out: dict[str, list[float]] = {}
        for source in (self.by_request, self.api_by_request):
            for rid, usd in source.items():
                out.setdefault(getattr(self._slices[rid], attr), []).append(usd)
        return {k: math.fsum(v) for k, v in out.items()}

    def rows(self) -> Iterator[AttributionRow]:
        """Every request's share (interval-priced, then API-priced) and every replica's idle cost."""
        for rid, usd in self.by_request.items():
            s = self._slices[rid]
            yield AttributionRow("request", usd, s.pool, replica_key(s.owner, s.replica_id), rid, s.tenant_id,
                                 s.key_id, s.model)
        for rid, usd in self.api_by_request.items():
            s = self._slices[rid]
            yield AttributionRow("api", usd, s.pool, None, rid, s.tenant_id, s.key_id, s.model)
        for key, usd in self.idle_by_replica.items():
            yield AttributionRow("idle", usd, self._pools[key], key)


def attribute(intervals: Sequence[IntervalCost], usage: Sequence[UsageSlice], *, start: datetime, end: datetime,
              weights: TokenWeights, token_prices: Mapping[str, TokenPrices] | None = None) -> Attribution:
    """Split the cost of ``intervals`` within ``[start, end]`` over ``usage`` and idle (module docstring)."""
    result = Attribution(start=start, end=end)
    result._slices = {u.request_id: u for u in usage}
    by_replica: dict[tuple[str, str], list[UsageSlice]] = {}
    for u in result._slices.values():
        by_replica.setdefault((u.owner, u.replica_id), []).append(u)
    shares: dict[str, list[float]] = {}
    idle: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}
    covered: set[str] = set()
    for iv in intervals:
        key = replica_key(iv.owner, iv.replica_id)
        result._pools[key] = iv.pool
        a, b = max(iv.start, start), min(iv.end, end)
        totals.setdefault(key, [])
        idle.setdefault(key, [])
        served = [u for u in by_replica.get((iv.owner, iv.replica_id), ())
                  if u.start <= iv.end and u.end >= iv.start]
        covered.update(u.request_id for u in served)  # served by a metered replica, even at no cost here
        if b <= a or iv.usd_per_hour <= 0:
            continue
        rate = iv.usd_per_hour / 3600.0
        totals[key].append(rate * (b - a).total_seconds())
        _split(served, rate, a, 0.0, (b - a).total_seconds(), weights, shares, idle[key])
    result.by_request = {rid: math.fsum(shares.get(rid, ())) for rid in result._slices
                         if rid in covered}
    result.idle_by_replica = {k: math.fsum(v) for k, v in idle.items()}
    result.total_by_replica = {k: math.fsum(v) for k, v in totals.items()}
    pools: dict[str, list[float]] = {}
    for k, usd in result.idle_by_replica.items():
        pools.setdefault(result._pools[k], []).append(usd)
    result.idle_by_pool = {p: math.fsum(v) for p, v in pools.items()}
    prices = token_prices or {}
    unpriced = []
    for u in result._slices.values():
        if u.request_id in covered or not (start <= u.end <= end):
            continue  # an uncovered request belongs to the window it ended in
        table = prices.get(u.model)
        if table is None:
            unpriced.append(u.request_id)
        else:
            result.api_by_request[u.request_id] = table.usd(u.prompt_tokens, u.cached_tokens, u.completion_tokens)
    result.unpriced = tuple(unpriced)
    return result


def _split(served: Sequence[UsageSlice], rate: float, t0: datetime, a: float, b: float, weights: TokenWeights,
           shares: dict[str, list[float]], idle: list[float]) -> None:
    """Sweep ``[a, b]`` (seconds after ``t0``): each segment's cost to the requests in flight, or idle."""
    events: list[tuple[float, int, str, float]] = []  # (time, +1 start / -1 end, request id, density)
    for u in served:
        s, e = (u.start - t0).total_seconds(), (u.end - t0).total_seconds()
        lo, hi = max(s, a), min(e, b)
        if hi <= lo:
            continue  # in flight for no time within [a, b]: no busy time to share
        density = weights.weighted(u.prompt_tokens, u.cached_tokens, u.completion_tokens) / (e - s)
        events.append((lo, 1, u.request_id, density))
        events.append((hi, -1, u.request_id, density))
    events.sort(key=lambda ev: (ev[0], ev[1]))  # ends before starts at the same instant
    active: dict[str, float] = {}
    t = a
    i = 0
    while i <= len(events):
        nxt = events[i][0] if i < len(events) else b
        if nxt > t:
            seg = rate * (nxt - t)
            if not active:
                idle.append(seg)
            else:
                total = math.fsum(active.values())
                if total > 0:
                    for rid, d in active.items():
                        if d > 0:
                            shares.setdefault(rid, []).append(seg * (d / total))
                else:
                    each = seg / len(active)
                    for rid in active:
                        shares.setdefault(rid, []).append(each)
            t = nxt
        if i == len(events):
            break
        _, kind, rid, d = events[i]
        if kind > 0:
            active[rid] = d
        else:
            active.pop(rid, None)
        i += 1
