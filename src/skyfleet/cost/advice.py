"""Right-sizing advice: from observed utilisation over a window, flag over-provisioned pools and propose
cheaper configurations from the instance catalog, each with its estimated saving per month.

Two pure steps, no I/O:

* :class:`SampleFolder` + :func:`summarise` turn replica intervals, utilisation samples (folded as
  they stream in, in time order) and, when known, the attribution's idle cost into a
  :class:`UtilisationSummary` per pool.
* :func:`advise` (a function of that summary, the catalog and ``now``) returns
  :class:`Recommendation` values: ``over_provisioned`` (a flag: "pool A was idle 78% of the last
  24 h"), ``fewer_replicas``, ``smaller_instance`` and ``spot_mix`` (N on-demand + M spot).

Each proposal is priced against the pool's current configuration (the replicas still running at
the end of the window) on its own; savings of two proposals for one pool are not additive.
A month is :data:`HOURS_PER_MONTH` hours. The assumptions behind each number are carried on the
recommendation (``assumptions``) and documented in docs/cost.md ("Right-sizing advice").
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from skyfleet.cost.catalog import Catalog, InstanceType

HOURS_PER_MONTH = 730.0
GIB = 2**30
#: Tiers whose instances can be swapped for another catalog type or for spot capacity.
_CLOUD_TIERS = ("on-demand", "spot")
KINDS = ("over_provisioned", "fewer_replicas", "cheaper_instance", "spot_mix")


@dataclass(frozen=True, slots=True)
class AdviceSettings:
    """The knobs of :func:`advise`, with their documented defaults."""

    #: Flag a pool idle at least this share of its cost over the window.
    idle_threshold: float = 0.5
    #: Capacity kept above the observed peak (0.25: 25 % more than the busiest moment needed).
    headroom: float = 0.25
    #: Share of GPU memory the engine may use (weights + KV cache); vLLM's default is 0.9.
    gpu_memory_utilisation: float = 0.9
    #: Fewer samples than this in a pool: not enough evidence to propose a capacity change.
    min_samples: int = 10
    #: Proposals saving less than this per month are not worth a change and are left out.
    min_monthly_saving_usd: float = 1.0


@dataclass(frozen=True, slots=True)
class ReplicaUse:
    """One replica's life in the window (one priced interval)."""

    replica_id: str
    instance_type: str | None
    region: str | None
    #: spot / on-demand / reserved / local
    tier: str
    usd_per_hour: float
    #: Hours of it inside the window.
    hours: float
    #: Still running at the end of the window (part of the current configuration).
    running: bool


@dataclass(frozen=True, slots=True)
class PoolUtilisation:
    pool: str
    model: str
    replicas: tuple[ReplicaUse, ...]
    #: Share (0..1) of the pool's cost that served no request; ``idle_source`` says where it came from.
    idle_fraction: float | None = None
    idle_source: str = "none"
    #: Highest KV-cache use (0..1) any replica reported.
    peak_kv_cache_usage: float | None = None
    #: Highest / median sum of ``busy_fraction`` across the pool's replicas at one time: replicas' worth of work.
    peak_busy_replicas: float | None = None
    median_busy_replicas: float | None = None
    #: Highest sum of running + waiting requests across the pool at one time, and of waiting alone.
    peak_concurrency: float | None = None
    peak_waiting: float | None = None
    #: Most requests one replica was seen running at once (a lower bound of its parallel slots).
    max_running_per_replica: float | None = None
    samples: int = 0
    #: Model weights in GiB when known; else estimated from the model name (:func:`estimate_weights_gib`).
    weights_gib: float | None = None

    @property
    def cost_usd(self) -> float:
        return sum(r.usd_per_hour * r.hours for r in self.replicas)

    @property
    def current(self) -> tuple[ReplicaUse, ...]:
        return tuple(r for r in self.replicas if r.running)


@dataclass(frozen=True, slots=True)
class UtilisationSummary:
    start: datetime
    end: datetime
    pools: tuple[PoolUtilisation, ...]


Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class Recommendation:
    kind: str
    pool: str
    #: One sentence for people.
    summary: str
    current: str
    proposed: str | None
    #: Estimated saving per month (``HOURS_PER_MONTH`` h) against the current configuration; None for a flag.
    monthly_saving_usd: float | None
    assumptions: tuple[str, ...] = ()
    detail: Mapping[str, Scalar] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"kind": self.kind, "pool": self.pool, "summary": self.summary, "current": self.current,
                "proposed": self.proposed,
                "monthly_saving_usd": None if self.monthly_saving_usd is None else round(self.monthly_saving_usd, 2),
                "assumptions": list(self.assumptions), "detail": dict(self.detail)}


# -- model weights --------------------------------------------------------------------------------

_PARAMS_RE = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z])", re.ASCII)
#: Bytes per parameter by quantisation hint in the model name (first match wins); default fp16/bf16.
_QUANT = ((re.compile(r"q2|iq2"), 0.35), (re.compile(r"q3|iq3"), 0.45),
          (re.compile(r"q4|int4|awq|gptq|4bit|nf4|mxfp4"), 0.57), (re.compile(r"q5"), 0.69),
          (re.compile(r"q6"), 0.82), (re.compile(r"q8|int8|fp8|8bit"), 1.06), (re.compile(r"f32|fp32"), 4.0))


def estimate_weights_gib(model: str) -> float | None:
    """GiB of weights from a model name that states its size ("llama-3.1-8b-instruct", "smollm2-135m",
    "mixtral-8x7b", "qwen2.5-0.5b-q4_k_m"): parameters x bytes per parameter (2 unless the name
    names a quantisation). None when the name states no size."""
    name = model.lower()
    sizes = [(int(m.group(1) or 1) * float(m.group(2)) * (1e9 if m.group(3) == "b" else 1e6))
             for m in _PARAMS_RE.finditer(name)]
    if not sizes:
        return None
    per_param = next((b for pattern, b in _QUANT if pattern.search(name)), 2.0)
    return max(sizes) * per_param / GIB


# -- summarising samples ---------------------------------------------------------------------------


class SampleLike(Protocol):
    @property
    def owner(self) -> str: ...
    @property
    def replica_id(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def pool(self) -> str: ...
    @property
    def running(self) -> float | None: ...
    @property
    def waiting(self) -> float | None: ...
    @property
    def kv_cache_usage(self) -> float | None: ...
    @property
    def busy_fraction(self) -> float | None: ...


class IntervalLike(Protocol):
    @property
    def owner(self) -> str: ...
    @property
    def replica_id(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def instance_type(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def tier(self) -> str: ...
    @property
    def usd_per_hour(self) -> float: ...
    @property
    def started_at(self) -> datetime: ...
    def end_at(self, now: datetime) -> datetime: ...


@dataclass(slots=True)
class _PoolStats:
    samples: int = 0
    busy_sum: float = 0.0
    busy_n: int = 0
    peak_kv: float | None = None
    max_running: float | None = None
    peak_waiting: float | None = None
    busy_series: list[float] = field(default_factory=list)
    conc_series: list[float] = field(default_factory=list)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class SampleFolder:
    """Folds samples, given in time order, into per-pool statistics with bounded memory.

    Samples are grouped into buckets of ``bucket`` (a replica sampled twice in one bucket counts
    with its highest values, which errs towards more capacity); at each bucket the pool's
    replicas' busy fractions and running + waiting counts are summed, giving the series whose
    peak and median the advice uses. Only the open bucket is held.
    """

    def __init__(self, bucket: timedelta = timedelta(minutes=1)) -> None:
        self._bucket_s = bucket.total_seconds()
        self._open: int | None = None
        # pool -> replica -> (busy, concurrency)
        self._cur: dict[str, dict[tuple[str, str], tuple[float | None, float | None]]] = {}
        self.pools: dict[str, _PoolStats] = {}

    def add(self, samples: Iterable[SampleLike]) -> None:
        for s in samples:
            b = int(s.at.timestamp() // self._bucket_s)
            if self._open is not None and b < self._open:
                raise ValueError("samples must come in time order")
            if b != self._open:
                self._flush()
                self._open = b
            st = self.pools.setdefault(s.pool, _PoolStats())
            st.samples += 1
            if s.busy_fraction is not None:
                st.busy_sum += s.busy_fraction
                st.busy_n += 1
            st.peak_kv = _max(st.peak_kv, s.kv_cache_usage)
            st.max_running = _max(st.max_running, s.running)
            st.peak_waiting = _max(st.peak_waiting, s.waiting)
            conc = None if s.running is None and s.waiting is None else (s.running or 0.0) + (s.waiting or 0.0)
            key = (s.owner, s.replica_id)
            busy0, conc0 = self._cur.setdefault(s.pool, {}).get(key, (None, None))
            self._cur[s.pool][key] = (_max(busy0, s.busy_fraction), _max(conc0, conc))

    def _flush(self) -> None:
        for pool, replicas in self._cur.items():
            st = self.pools[pool]
            busy = [b for b, _ in replicas.values() if b is not None]
            conc = [c for _, c in replicas.values() if c is not None]
            if busy:
                st.busy_series.append(sum(busy))
            if conc:
                st.conc_series.append(sum(conc))
        self._cur = {}

    def finish(self) -> dict[str, _PoolStats]:
        self._flush()
        self._open = None
        return self.pools


def summarise(intervals: Sequence[IntervalLike], folded: Mapping[str, _PoolStats], *, start: datetime,
              end: datetime, now: datetime,
              idle: Mapping[str, tuple[float, float]] | None = None) -> UtilisationSummary:
    """The summary :func:`advise` takes. ``idle``: pool -> (idle USD, total USD) from the attribution;
    without it a pool's idle share is 1 - its mean busy fraction (samples)."""
    running_at = min(end, now)
    by_pool: dict[str, list[tuple[IntervalLike, float, bool]]] = {}
    for iv in intervals:
        iv_end = iv.end_at(now)
        hours = max(0.0, (min(iv_end, end) - max(iv.started_at, start)).total_seconds() / 3600)
        by_pool.setdefault(iv.pool, []).append((iv, hours, iv_end >= running_at))
    pools = []
    for name in sorted(by_pool):
        rows = by_pool[name]
        st = folded.get(name, _PoolStats())
        idle_fraction, source = None, "none"
        if idle and name in idle and idle[name][1] > 0:
            idle_fraction, source = idle[name][0] / idle[name][1], "attribution"
        elif st.busy_n:
            idle_fraction, source = max(0.0, 1 - st.busy_sum / st.busy_n), "samples"
        pools.append(PoolUtilisation(
            pool=name, model=rows[-1][0].model,
            replicas=tuple(ReplicaUse(f"{iv.owner}/{iv.replica_id}", iv.instance_type, iv.region, iv.tier,
                                      iv.usd_per_hour, hours, running) for iv, hours, running in rows),
            idle_fraction=idle_fraction, idle_source=source, peak_kv_cache_usage=st.peak_kv,
            peak_busy_replicas=max(st.busy_series) if st.busy_series else None,
            median_busy_replicas=statistics.median(st.busy_series) if st.busy_series else None,
            peak_concurrency=max(st.conc_series) if st.conc_series else None,
            peak_waiting=st.peak_waiting, max_running_per_replica=st.max_running, samples=st.samples))
    return UtilisationSummary(start=start, end=end, pools=tuple(pools))


# -- advice ---------------------------------------------------------------------------------------


def _money(usd: float) -> str:
    """Cents, or the digits a small amount needs ($0.0042, $0.000761): a local pool's hour costs cents."""
    digits = 2 if abs(usd) >= 1 or usd == 0 else 4 if abs(usd) >= 0.01 else 6
    return f"${usd:,.{digits}f}"


def _window_words(summary: UtilisationSummary, now: datetime) -> str:
    hours = (summary.end - summary.start).total_seconds() / 3600
    span = f"{hours:.0f} h" if hours >= 1 and abs(hours - round(hours)) < 0.05 else f"{hours:.1f} h"
    if abs((now - summary.end).total_seconds()) <= 60:
        return f"the last {span}"
    return f"the {span} to {summary.end:%Y-%m-%d %H:%M} UTC"


def _describe(replicas: Sequence[ReplicaUse]) -> str:
    groups: dict[tuple[str, str], list[ReplicaUse]] = {}
    for r in replicas:
        groups.setdefault((r.instance_type or "local", r.tier), []).append(r)
    parts = [f"{len(rs)} x {itype} {tier}" for (itype, tier), rs in sorted(groups.items())]
    return f"{' + '.join(parts)} ({_money(sum(r.usd_per_hour for r in replicas))}/h)"


def _needed_replicas(p: PoolUtilisation, s: AdviceSettings) -> tuple[int, list[str]] | None:
    """Replicas that would have carried the window's peak with headroom; None without the evidence."""
    if p.samples < s.min_samples or p.peak_busy_replicas is None:
        return None
    why = [f"the busiest minute needed {p.peak_busy_replicas:.2f} replicas' worth of work (sum of busy "
           f"fractions); {s.headroom:.0%} headroom on top"]
    needed = math.ceil(p.peak_busy_replicas * (1 + s.headroom) - 1e-9)
    if p.peak_concurrency is not None and p.max_running_per_replica:
        by_slots = math.ceil(p.peak_concurrency * (1 + s.headroom) / p.max_running_per_replica - 1e-9)
        why.append(f"peak {p.peak_concurrency:.0f} concurrent requests at no more than "
                   f"{p.max_running_per_replica:.0f} running per replica (the most one was seen running)")
        needed = max(needed, by_slots)
    return max(1, needed), why


def _fewer(p: PoolUtilisation, s: AdviceSettings) -> Recommendation | None:
    current = p.current
    found = _needed_replicas(p, s)
    if found is None or not current or (p.peak_waiting or 0) > 0:
        return None  # no evidence, nothing running, or requests queued at some point: the pool was full
    needed, why = found
    if needed >= len(current):
        return None
    removed = sorted(current, key=lambda r: r.usd_per_hour, reverse=True)[:len(current) - needed]
    kept = [r for r in current if r not in removed]
    saving = sum(r.usd_per_hour for r in removed) * HOURS_PER_MONTH
    return Recommendation(
        kind="fewer_replicas", pool=p.pool,
        summary=f"pool {p.pool}: {needed} replica(s) instead of {len(current)} would have carried the observed "
                f"peak with {s.headroom:.0%} headroom, saving {_money(saving)}/month",
        current=_describe(current), proposed=_describe(kept), monthly_saving_usd=saving,
        assumptions=(*why, "no request waited in a queue during the window",
                     "the next weeks look like this window"),
        detail={"replicas": len(current), "proposed_replicas": needed,
                "peak_busy_replicas": p.peak_busy_replicas, "peak_concurrency": p.peak_concurrency})


def _memory_needed(p: PoolUtilisation, itype: InstanceType, s: AdviceSettings) -> tuple[float, list[str]] | None:
    if p.peak_kv_cache_usage is None:
        return None
    total = float(itype.total_gpu_memory_gib)
    kv_peak = min(1.0, max(0.0, p.peak_kv_cache_usage))
    weights = p.weights_gib if p.weights_gib is not None else estimate_weights_gib(p.model)
    u = s.gpu_memory_utilisation
    if weights is not None:
        kv_capacity = max(0.0, u * total - weights)
        needed = (weights + kv_peak * kv_capacity * (1 + s.headroom)) / u
        source = "given" if p.weights_gib is not None else "estimated from the model name"
        why = [f"model weights {weights:.1f} GiB ({source}); the KV cache is the rest of {u:.0%} of "
               f"{total:.0f} GiB, of which at most {kv_peak:.0%} was in use; {s.headroom:.0%} headroom on the "
               f"KV cache; the engine may use {u:.0%} of GPU memory"]
    else:
        needed = total * kv_peak * (1 + s.headroom)
        why = [f"model size unknown: memory needed taken as the current {total:.0f} GiB x the peak KV-cache use "
               f"{kv_peak:.0%} (+{s.headroom:.0%}); this counts the weights as part of the used share: check "
               "that the model fits before switching"]
    why.append("the model can be split over an instance's GPUs (tensor parallel), so an instance's GPU memory "
               "is the sum over its GPUs")
    return needed, why


def _cheaper(p: PoolUtilisation, catalog: Catalog, s: AdviceSettings) -> Recommendation | None:
    current = p.current
    kinds = {(r.instance_type, r.region, r.tier) for r in current}
    if len(kinds) != 1:
        return None  # nothing running, or a mixed pool: no single type to replace
    itype_name, region, tier = next(iter(kinds))
    if itype_name is None or region is None or tier not in _CLOUD_TIERS:
        return None
    itype = next((t for t in catalog if t.name == itype_name and t.region == region), None)
    found = _memory_needed(p, itype, s) if itype is not None else None
    if itype is None or found is None:
        return None
    needed_gib, why = found
    spot = tier == "spot"
    per_replica = max(r.usd_per_hour for r in current)
    for cand in catalog.cheapest(min_gpu_memory_gib=needed_gib, regions=[region], spot=spot):
        price = cand.spot_usd_per_hr if spot and cand.spot_usd_per_hr is not None else cand.ondemand_usd_per_hr
        if cand.name == itype.name or price >= per_replica:
            continue
        saving = (per_replica - price) * len(current) * HOURS_PER_MONTH
        return Recommendation(
            kind="cheaper_instance", pool=p.pool,
            summary=f"pool {p.pool}: {cand.name} ({cand.accelerator_count} x {cand.accelerator}, "
                    f"{cand.total_gpu_memory_gib} GiB) instead of {itype.name} ({itype.total_gpu_memory_gib} GiB) "
                    f"fits the observed peak ({needed_gib:.1f} GiB needed), saving {_money(saving)}/month",
            current=_describe(current),
            proposed=f"{len(current)} x {cand.name} {tier} ({_money(price * len(current))}/h)",
            monthly_saving_usd=saving,
            assumptions=(*why, f"{tier} prices from the catalog for {region}"),
            detail={"instance_type": itype.name, "proposed_instance_type": cand.name, "region": region,
                    "memory_needed_gib": round(needed_gib, 2), "proposed_gpu_memory_gib": cand.total_gpu_memory_gib,
                    "usd_per_hour": per_replica, "proposed_usd_per_hour": price})
    return None


def _spot_mix(p: PoolUtilisation, catalog: Catalog, s: AdviceSettings) -> Recommendation | None:
    current = p.current
    kinds = {(r.instance_type, r.region, r.tier) for r in current}
    if len(kinds) != 1 or p.samples < s.min_samples or p.median_busy_replicas is None:
        return None
    itype_name, region, tier = next(iter(kinds))
    if tier != "on-demand" or itype_name is None or region is None:
        return None
    itype = next((t for t in catalog if t.name == itype_name and t.region == region), None)
    if itype is None or itype.spot_usd_per_hr is None:
        return None
    floor = max(1, math.ceil(p.median_busy_replicas * (1 + s.headroom) - 1e-9))
    spot_n = len(current) - floor
    per_replica = max(r.usd_per_hour for r in current)
    if spot_n <= 0 or itype.spot_usd_per_hr >= per_replica:
        return None
    saving = spot_n * (per_replica - itype.spot_usd_per_hr) * HOURS_PER_MONTH
    return Recommendation(
        kind="spot_mix", pool=p.pool,
        summary=f"pool {p.pool}: {floor} on-demand + {spot_n} spot {itype.name} instead of {len(current)} "
                f"on-demand, saving {_money(saving)}/month",
        current=_describe(current),
        proposed=f"{floor} x {itype.name} on-demand + {spot_n} x {itype.name} spot "
                 f"({_money(floor * per_replica + spot_n * itype.spot_usd_per_hr)}/h)",
        monthly_saving_usd=saving,
        assumptions=(f"the on-demand floor carries the median load ({p.median_busy_replicas:.2f} replicas' worth "
                     f"of work, +{s.headroom:.0%}) when spot capacity is reclaimed",
                     f"spot at the catalog's median spot price for {region} "
                     f"({_money(itype.spot_usd_per_hr)}/h); spot prices move and instances can be preempted"),
        detail={"on_demand": floor, "spot": spot_n, "instance_type": itype.name, "region": region,
                "usd_per_hour": per_replica, "spot_usd_per_hour": itype.spot_usd_per_hr})


def _idle_flag(p: PoolUtilisation, window: str, s: AdviceSettings) -> Recommendation | None:
    if p.idle_fraction is None or p.idle_fraction < s.idle_threshold or p.cost_usd <= 0:
        return None
    idle_usd = p.idle_fraction * p.cost_usd
    return Recommendation(
        kind="over_provisioned", pool=p.pool,
        summary=f"pool {p.pool} was idle {p.idle_fraction:.0%} of {window} "
                f"({_money(idle_usd)} of {_money(p.cost_usd)})",
        current=_describe(p.current) if p.current else "nothing running now", proposed=None,
        monthly_saving_usd=None,
        assumptions=(f"idle share from the {p.idle_source}" if p.idle_source != "attribution" else
                     "idle share of the pool's cost from the attribution (cost that served no request)",),
        detail={"idle_fraction": round(p.idle_fraction, 4), "idle_usd": round(idle_usd, 6),
                "cost_usd": round(p.cost_usd, 6), "idle_source": p.idle_source})


def advise(summary: UtilisationSummary, catalog: Catalog, *, now: datetime,
           settings: AdviceSettings = AdviceSettings()) -> list[Recommendation]:
    """Recommendations for every pool of ``summary``, by pool, in the order of :data:`KINDS`.

    An empty list means there is nothing to advise: no pool idle past the threshold, and no cheaper
    configuration that would have carried what the window saw.
    """
    window = _window_words(summary, now)
    out: list[Recommendation] = []
    for p in sorted(summary.pools, key=lambda p: p.pool):
        flag = _idle_flag(p, window, settings)
        if flag is not None:
            out.append(flag)
        for rec in (_fewer(p, settings), _cheaper(p, catalog, settings), _spot_mix(p, catalog, settings)):
            if rec is not None and (rec.monthly_saving_usd or 0) >= settings.min_monthly_saving_usd:
                out.append(rec)
    return out
