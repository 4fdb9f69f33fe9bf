"""What one simulated run produced: :class:`SimResult`, and the arithmetic that turns per-request times into it.

Every number is derived from per-request arrays (arrival, TTFT, TPOT, end-to-end; NaN for a request that
got no answer) and per-replica billing intervals, so the summary can be recomputed and checked by hand.

Conventions:

* **SLO attainment** is over the requests the fleet could serve at all: every request of the trace but the
  ``rejected`` ones (longer than the model's context, a 400 whatever the fleet). A dropped request (503 after
  the admission queue's timeout) fails both objectives. ``ttft``: TTFT <= ``slo.ttft_p95_s``; ``tpot``:
  mean inter-token latency of the request <= ``slo.tpot_p95_s`` (a one-token answer has none and meets it);
  ``both``: the two at once.
* **Percentiles** (p50/p95/p99, numpy's linear interpolation) are over the answered requests; TPOT's over
  those with at least two tokens.
* **Cost**: each replica bills from the request that started it (cold start included) to its stop, at its
  pool's catalog price ($/hour, spot or on-demand); GPU-hours are its hours times the instance's GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BillingRecord", "SimResult", "attainment", "latency_summary", "percentiles", "window_attainment"]

_F64 = npt.NDArray[np.float64]
QUANTILES = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class BillingRecord:
    """One replica's life: billed over ``[start_s, stop_s)`` at ``usd_per_hour``."""

    replica_id: str
    pool: str
    tier: str
    usd_per_hour: float
    gpus: int
    start_s: float
    stop_s: float
    ready_s: float | None  # None: stopped before it was ready

    @property
    def hours(self) -> float:
        return max(self.stop_s - self.start_s, 0.0) / 3600.0

    @property
    def usd(self) -> float:
        return self.hours * self.usd_per_hour


def percentiles(values: _F64) -> dict[str, float | None]:
    """p50/p95/p99 of the finite values (None for all when there are none)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {f"p{q}": None for q in QUANTILES}
    return {f"p{q}": float(x) for q, x in zip(QUANTILES, np.percentile(v, QUANTILES), strict=True)}


def attainment(ttft: _F64, tpot: _F64, served: npt.NDArray[np.bool_], slo_ttft: float, slo_tpot: float,
               mask: npt.NDArray[np.bool_] | None = None) -> dict[str, float | None]:
    """Fractions of the requests under ``mask`` (default: all) meeting each objective (see the module)."""
    m = np.ones(ttft.shape, dtype=bool) if mask is None else mask
    n = int(m.sum())
    if n == 0:
        return {"ttft": None, "tpot": None, "both": None}
    ok_ttft = served & (ttft <= slo_ttft)
    ok_tpot = served & ~(tpot > slo_tpot)  # NaN (one token) meets it
    return {"ttft": float((ok_ttft & m).sum()) / n, "tpot": float((ok_tpot & m).sum()) / n,
            "both": float((ok_ttft & ok_tpot & m).sum()) / n}


def latency_summary(ttft: _F64, tpot: _F64, e2e: _F64) -> dict[str, dict[str, float | None]]:
    return {"ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "e2e_s": percentiles(e2e)}


def window_attainment(arrival: _F64, ttft: _F64, tpot: _F64, served: npt.NDArray[np.bool_],
                      counted: npt.NDArray[np.bool_], slo_ttft: float, slo_tpot: float,
                      window_s: float) -> list[dict[str, float | int | None]]:
    """SLO attainment per ``window_s`` of arrival time: ``[{start_s, requests, both, ttft, tpot}, ...]``."""
    if arrival.size == 0:
        return []
    idx = np.floor(arrival / window_s).astype(np.int64)
    out: list[dict[str, float | int | None]] = []
    for w in range(int(idx.max()) + 1):
        m = (idx == w) & counted
        a = attainment(ttft, tpot, served, slo_ttft, slo_tpot, m)
        out.append({"start_s": w * window_s, "requests": int(m.sum()), **a})
    return out


@dataclass(frozen=True, eq=False)
class SimResult:
    """The outcome of :func:`skyfleet.planner.simulator.simulate` for one policy (``to_json`` for the file)."""

    policy: str
    trace: str
    slo: Mapping[str, float]  # ttft_s, tpot_s (the p95 objectives)
    duration_s: float  # simulated time: max(last arrival, last answer)
    requests: int
    completed: int
    dropped: int  # 503: waited longer than the admission queue's timeout with no replica ready
    rejected: int  # 400: longer than the model's context on the replica chosen
    delayed: int  # answered after waiting in the admission queue (no replica was ready)
    retried: int  # moved to another replica because theirs was reclaimed before they finished
    preemptions: int  # spot preemption notices (replicas lost)
    start_failures: int  # replica starts refused (spot capacity unavailable), retried at the next tick
    decisions: int
    cost_usd: float
    cost_by_pool: Mapping[str, float]
    cost_by_tier: Mapping[str, float]
    gpu_hours: float
    replica_hours: float
    attainment: Mapping[str, float | None]  # ttft, tpot, both
    latency: Mapping[str, Mapping[str, float | None]]  # ttft_s/tpot_s/e2e_s -> p50/p95/p99
    series: Mapping[str, Any]  # per controller tick: t_s, queue, cost_usd, ready, by_pool{}, by_tier{}
    windows: Sequence[Mapping[str, float | int | None]]
    billing: Sequence[BillingRecord] = ()
    wall_s: float = 0.0
    #: per request (trace order): seconds, NaN where not answered; not in to_json unless asked
    arrival_s: _F64 = field(default_factory=lambda: np.zeros(0))
    ttft_s: _F64 = field(default_factory=lambda: np.zeros(0))
    tpot_s: _F64 = field(default_factory=lambda: np.zeros(0))
    e2e_s: _F64 = field(default_factory=lambda: np.zeros(0))

    @property
    def slo_met(self) -> float | None:
        return self.attainment.get("both")

    def to_json(self, *, requests: bool = False, billing: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (numbers, strings, lists, dicts only; NaN/inf become None)."""
        out: dict[str, Any] = {
            "policy": self.policy, "trace": self.trace, "slo": dict(self.slo), "duration_s": self.duration_s,
            "requests": self.requests, "completed": self.completed, "dropped": self.dropped,
            "rejected": self.rejected, "delayed": self.delayed, "retried": self.retried,
            "preemptions": self.preemptions, "start_failures": self.start_failures, "decisions": self.decisions,
            "cost_usd": self.cost_usd, "cost_by_pool": dict(self.cost_by_pool),
            "cost_by_tier": dict(self.cost_by_tier), "gpu_hours": self.gpu_hours,
            "replica_hours": self.replica_hours, "attainment": dict(self.attainment),
            "latency": {k: dict(v) for k, v in self.latency.items()}, "series": self.series,
            "windows": [dict(w) for w in self.windows], "wall_s": self.wall_s,
        }
        if billing:
            out["billing"] = [{"replica_id": b.replica_id, "pool": b.pool, "tier": b.tier,
                               "usd_per_hour": b.usd_per_hour, "gpus": b.gpus, "start_s": b.start_s,
                               "stop_s": b.stop_s, "ready_s": b.ready_s} for b in self.billing]
        if requests:
            out["per_request"] = {"arrival_s": self.arrival_s.tolist(), "ttft_s": self.ttft_s.tolist(),
                                  "tpot_s": self.tpot_s.tolist(), "e2e_s": self.e2e_s.tolist()}
        return _clean(out)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x
