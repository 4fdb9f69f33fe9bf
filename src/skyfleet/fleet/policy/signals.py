"""The observed window: recent per-replica engine samples and the gateway's queue, for the policies.

The health checker already scrapes every ready replica's ``/metrics`` into an
:class:`~skyfleet.engines.metrics.EngineMetrics`; :meth:`ReplicaSample.from_metrics` keeps the numbers a
policy needs (running and waiting requests, KV-cache usage, token counters, TTFT/TPOT histograms), and
:class:`SignalWindow` keeps the last ``horizon_s`` seconds of them in memory, bounded per replica. The
gateway adds its own admission-queue depth (:class:`QueueSample`).

A policy never sees the mutable window: it gets a frozen :class:`WindowSnapshot` and asks it for
:class:`Aggregate` numbers over its last ``N`` seconds. Times are epoch seconds (``Clock.wall``), like
the policies' ``now``. Rates come from counter deltas (a counter that goes down is a restarted engine:
counting resumes from zero); p95 latencies from histogram deltas merged over replicas.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from skyfleet.engines.metrics import EngineMetrics, Histogram

__all__ = ["Aggregate", "QueueSample", "ReplicaSample", "ReplicaStats", "SignalWindow", "WindowSnapshot",
           "merge_histograms"]


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """One scrape of one replica."""

    at: float
    replica_id: str
    pool: str
    running: float
    waiting: float
    kv_cache_usage: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    ttft: Histogram | None = None
    tpot: Histogram | None = None

    @classmethod
    def from_metrics(cls, at: float, replica_id: str, pool: str, m: EngineMetrics) -> ReplicaSample:
        return cls(at=at, replica_id=replica_id, pool=pool, running=m.requests_running,
                   waiting=m.requests_waiting, kv_cache_usage=m.kv_cache_usage,
                   prompt_tokens_total=m.prompt_tokens_total, generation_tokens_total=m.generation_tokens_total,
                   ttft=m.ttft_seconds, tpot=m.tpot_seconds)


@dataclass(frozen=True, slots=True)
class QueueSample:
    """Requests waiting in the gateway for a replica of the model (the admission queue)."""

    at: float
    queued: int


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """One replica over the aggregation period."""

    replica_id: str
    pool: str
    samples: int
    running_latest: float
    waiting_latest: float
    running_mean: float
    running_max: float
    waiting_mean: float
    waiting_max: float
    kv_usage_mean: float | None
    generation_tps: float | None  # None: fewer than two samples with the counter
    prompt_tps: float | None


@dataclass(frozen=True, slots=True)
class Aggregate:
    """The model's fleet over the last ``period_s`` seconds before ``now``.

    Sums over replicas of each replica's mean/max (``running_mean`` is the mean number of running
    requests in the whole fleet; ``waiting_max`` an upper bound of the fleet's peak), rates summed over
    replicas with a known rate, p95 latencies from the merged histogram deltas (None: nothing observed).
    """

    now: float
    period_s: float
    replicas: tuple[ReplicaStats, ...]
    running_mean: float
    running_max: float
    waiting_mean: float
    waiting_max: float
    waiting_latest: float
    kv_usage_mean: float | None
    kv_usage_max: float | None
    generation_tps: float
    prompt_tps: float
    queue_mean: float
    queue_max: int
    queue_latest: int
    ttft_p95_s: float | None
    tpot_p95_s: float | None

    def pool_count(self, pool: str) -> int:
        return sum(1 for r in self.replicas if r.pool == pool)

    def pool_peak_tps(self, pool: str) -> float | None:
        """The highest generation rate of one replica of ``pool`` (its demonstrated throughput)."""
        rates = [r.generation_tps for r in self.replicas if r.pool == pool and r.generation_tps]
        return max(rates) if rates else None


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """An immutable copy of the window (what a policy gets)."""

    replicas: tuple[tuple[ReplicaSample, ...], ...]  # per replica, oldest first; each non-empty
    queue: tuple[QueueSample, ...] = ()

    def aggregate(self, now: float, period_s: float) -> Aggregate:
        """Numbers over ``(now - period_s, now]``; replicas with no sample in it are left out."""
        start = now - period_s
        stats: list[ReplicaStats] = []
        ttfts: list[Histogram] = []
        tpots: list[Histogram] = []
        for samples in self.replicas:
            inside = [s for s in samples if start < s.at <= now]
            if not inside:
                continue
            before = [s for s in samples if s.at <= start]
            base = before[-1] if before else inside[0]
            series = ([base] if before else []) + inside
            stats.append(_stats(inside, series))
            if base is inside[-1]:
                continue  # one point: no delta (a cumulative histogram would count the engine's whole life)
            for attr, out in (("ttft", ttfts), ("tpot", tpots)):
                last, first = getattr(inside[-1], attr), getattr(base, attr)
                if last is not None:
                    out.append(last.minus(first) if first is not None else last)
        queue = [q for q in self.queue if start < q.at <= now]
        kv = [r.kv_usage_mean for r in stats if r.kv_usage_mean is not None]
        return Aggregate(
            now=now, period_s=period_s, replicas=tuple(stats),
            running_mean=math.fsum(r.running_mean for r in stats),
            running_max=math.fsum(r.running_max for r in stats),
            waiting_mean=math.fsum(r.waiting_mean for r in stats),
            waiting_max=math.fsum(r.waiting_max for r in stats),
            waiting_latest=math.fsum(r.waiting_latest for r in stats),
            kv_usage_mean=math.fsum(kv) / len(kv) if kv else None,
            kv_usage_max=max(kv) if kv else None,
            generation_tps=math.fsum(r.generation_tps for r in stats if r.generation_tps is not None),
            prompt_tps=math.fsum(r.prompt_tps for r in stats if r.prompt_tps is not None),
            queue_mean=math.fsum(q.queued for q in queue) / len(queue) if queue else 0.0,
            queue_max=max((q.queued for q in queue), default=0),
            queue_latest=queue[-1].queued if queue else 0,
            ttft_p95_s=_p95(ttfts),
            tpot_p95_s=_p95(tpots),
        )


class SignalWindow:
    """The last ``horizon_s`` seconds of samples, at most ``max_samples`` per replica (ring buffers).

    Single-threaded (lives on the controller's event loop). Samples of a replica must arrive in time order.
    """

    def __init__(self, *, horizon_s: float = 900.0, max_samples: int = 512, max_replicas: int = 4096) -> None:
        if horizon_s <= 0 or max_samples < 2 or max_replicas < 1:
            raise ValueError("horizon_s > 0, max_samples >= 2 and max_replicas >= 1 are required")
        self._horizon_s = horizon_s
        self._max_samples = max_samples
        self._max_replicas = max_replicas
        self._replicas: dict[str, deque[ReplicaSample]] = {}
        self._queue: deque[QueueSample] = deque(maxlen=max_samples)

    def add(self, sample: ReplicaSample) -> None:
        ring = self._replicas.get(sample.replica_id)
        if ring is None:
            if len(self._replicas) >= self._max_replicas:
                self._evict_stalest()
            ring = self._replicas[sample.replica_id] = deque(maxlen=self._max_samples)
        elif ring and sample.at < ring[-1].at:
            raise ValueError(f"sample of {sample.replica_id} is older than the last one")
        ring.append(sample)

    def add_queue(self, sample: QueueSample) -> None:
        if self._queue and sample.at < self._queue[-1].at:
            raise ValueError("queue sample is older than the last one")
        self._queue.append(sample)

    def forget(self, replica_id: str) -> None:
        """The replica is gone: its samples no longer describe the fleet."""
        self._replicas.pop(replica_id, None)

    def replica_ids(self) -> list[str]:
        return sorted(self._replicas)

    def prune(self, now: float) -> None:
        cutoff = now - self._horizon_s
        for rid in list(self._replicas):
            ring = self._replicas[rid]
            while ring and ring[0].at < cutoff:
                ring.popleft()
            if not ring:
                del self._replicas[rid]
        while self._queue and self._queue[0].at < cutoff:
            self._queue.popleft()

    def snapshot(self, now: float) -> WindowSnapshot:
        """Prune what is older than the horizon and copy the rest."""
        self.prune(now)
        return WindowSnapshot(replicas=tuple(tuple(self._replicas[rid]) for rid in sorted(self._replicas)),
                              queue=tuple(self._queue))

    def _evict_stalest(self) -> None:
        stalest = min(self._replicas, key=lambda rid: self._replicas[rid][-1].at if self._replicas[rid] else -1)
        del self._replicas[stalest]


def _stats(inside: list[ReplicaSample], series: list[ReplicaSample]) -> ReplicaStats:
    last = inside[-1]
    kv = [s.kv_cache_usage for s in inside if s.kv_cache_usage is not None]
    return ReplicaStats(
        replica_id=last.replica_id, pool=last.pool, samples=len(inside),
        running_latest=last.running, waiting_latest=last.waiting,
        running_mean=math.fsum(s.running for s in inside) / len(inside),
        running_max=max(s.running for s in inside),
        waiting_mean=math.fsum(s.waiting for s in inside) / len(inside),
        waiting_max=max(s.waiting for s in inside),
        kv_usage_mean=math.fsum(kv) / len(kv) if kv else None,
        generation_tps=_rate(series, "generation_tokens_total"),
        prompt_tps=_rate(series, "prompt_tokens_total"),
    )


def _rate(series: list[ReplicaSample], attr: str) -> float | None:
    """Counter increase per second over the series; a decrease is a reset (the new value counts whole)."""
    points = [(s.at, v) for s in series if (v := getattr(s, attr)) is not None]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    total = 0.0
    for (_, a), (_, b) in pairwise(points):
        total += b - a if b >= a else b
    return total / (points[-1][0] - points[0][0])


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram | None:
    """Sum histograms; bounds that differ are merged on their union (each counts at its largest own
    bound at or below: exact when the bounds agree, a lower bound otherwise, as in engines.metrics)."""
    hs = list(histograms)
    if not hs:
        return None
    bounds = sorted({le for h in hs for le, _ in h.buckets})
    merged = [0.0] * len(bounds)
    for h in hs:
        position, current = 0, 0.0
        for i, le in enumerate(bounds):
            while position < len(h.buckets) and h.buckets[position][0] <= le:
                current = h.buckets[position][1]
                position += 1
            merged[i] += current
    return Histogram(tuple(zip(bounds, merged, strict=True)), math.fsum(h.sum for h in hs),
                     math.fsum(h.count for h in hs))


def _p95(histograms: list[Histogram]) -> float | None:
    merged = merge_histograms(histograms)
    return merged.quantile(0.95) if merged is not None else None
