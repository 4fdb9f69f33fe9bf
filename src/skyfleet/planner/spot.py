"""Spot availability traces for the simulator: when a spot pool can hold replicas, and when it loses them.

Source: SkyPilot's spot traces (``skypilot-org/spot-traces``, data of Wu et al., "Can't Be Late: Optimizing
Spot Instance Savings under Deadlines", NSDI 2024), as shipped in ``shared/data`` (see its README, section 4):
``spot_traces_skypilot_intervals.csv`` (run-length intervals ``start_s, end_s, value`` per ``trace_id``).

How ``value`` is read (the README calls it ambiguous; this is the reading used everywhere here):

* **1-node traces** (``nodes == 1``, values 0/1): as in the authors' simulator (``sky_spot`` ``TraceEnv``:
  ``spot_available = not trace[tick]``), **0 means spot capacity is available, 1 means preempted or
  unavailable**. So ``availability/1-node/aws-02-15-2023/us-east-1a_v100_1`` (mean value 0.17) is available
  83% of the time.
* **4- and 16-node traces**: ``value`` counts the instances available (0..nodes); spot is *available* while
  at least one is (``value >= 1``). The simulator does not model partial capacity.

Time: simulation time ``t`` maps to trace time ``(t + offset_s)``, modulo the trace's length when
``cyclic`` (the default; the traces last days, a replay usually an hour), else clamped to the last interval.

Pool mapping (:func:`map_spot_pools`): a name given by the user (``--spot-trace``: a ``trace_id`` or a unique
part of one, e.g. ``us-east-1f_v100_1``) applies to every spot pool; otherwise each spot pool gets the
availability trace (1-node first, sorted by id) whose zone is in the pool's region, a different zone for each
spot pool while there are zones left (AZ-diverse pools); a pool whose region has no trace is always available.
No trace covers the GPUs of today's inference instances (A10G, L4, L40S): the V100 traces stand in for them.
"""

from __future__ import annotations

import csv
import math
import os
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyfleet.fleet.spec import ModelFleet

__all__ = ["INTERVALS_FILE", "SpotTrace", "SpotTraceError", "data_dir", "find_spot_trace", "load_spot_traces",
           "map_spot_pools"]

INTERVALS_FILE = "spot_traces_skypilot_intervals.csv"
_COLUMNS = ("trace_id", "kind", "nodes", "zone", "start_s", "end_s", "value")


class SpotTraceError(ValueError):
    """A spot trace file or name that cannot be used."""


def data_dir() -> Path:
    """The shared data folder: ``$SKYFLEET_DATA_DIR``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("SKYFLEET_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True, slots=True)
class SpotTrace:
    """One zone's spot availability: ``up[i]`` holds over trace time ``[starts[i], starts[i+1])``.

    ``starts`` begins at 0 and ascends strictly; consecutive intervals differ in ``up`` (merged at load).
    """

    name: str
    zone: str
    starts: tuple[float, ...]
    up: tuple[bool, ...]
    period_s: float
    offset_s: float = 0.0
    cyclic: bool = True

    def __post_init__(self) -> None:
        if not self.starts or len(self.starts) != len(self.up) or self.starts[0] != 0.0:
            raise SpotTraceError(f"spot trace {self.name}: intervals must start at 0, one flag each")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)):
            raise SpotTraceError(f"spot trace {self.name}: interval starts must ascend")
        if not self.period_s > self.starts[-1]:
            raise SpotTraceError(f"spot trace {self.name}: period must end after the last interval starts")

    @classmethod
    def constant(cls, available: bool = True, name: str = "always") -> SpotTrace:
        return cls(name=name, zone="", starts=(0.0,), up=(available,), period_s=math.inf, cyclic=False)

    def at(self, offset_s: float = 0.0, *, cyclic: bool = True) -> SpotTrace:
        """The same trace with simulation time 0 at trace time ``offset_s``."""
        return replace(self, offset_s=offset_s, cyclic=cyclic)

    @property
    def availability(self) -> float:
        """Fraction of the trace's length during which spot is available."""
        if math.isinf(self.period_s):
            return 1.0 if self.up[0] else 0.0
        ends = (*self.starts[1:], self.period_s)
        return sum(e - s for s, e, u in zip(self.starts, ends, self.up, strict=True) if u) / self.period_s

    def _trace_time(self, t: float) -> float:
        u = t + self.offset_s
        if math.isinf(self.period_s):
            return max(u, 0.0)
        if self.cyclic:
            return u % self.period_s
        return min(max(u, 0.0), self.period_s)

    def available(self, t: float) -> bool:
        """Whether spot capacity is there at simulation time ``t``."""
        return self.up[bisect_right(self.starts, self._trace_time(t)) - 1]

    def next_change(self, t: float) -> float:
        """The first simulation time after ``t`` at which :meth:`available` changes (``inf``: never)."""
        if len(self.up) == 1:
            return math.inf
        u = self._trace_time(t)
        i = bisect_right(self.starts, u) - 1
        if i + 1 < len(self.starts):
            return t + (self.starts[i + 1] - u)
        if not self.cyclic:
            return math.inf
        # the last interval runs to the period's end; the first one (0) comes next, and it differs
        # from the last one unless they merge across the wrap
        if self.up[0] != self.up[-1]:
            return t + (self.period_s - u)
        return t + (self.period_s - u) + self.starts[1]


def _rows(path: Path) -> Iterable[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise SpotTraceError(f"{path}: missing columns {missing}")
            yield from reader
    except OSError as exc:
        raise SpotTraceError(f"{path}: cannot read: {exc.strerror}") from None


def load_spot_traces(path: Path | None = None) -> dict[str, SpotTrace]:
    """Every trace of the intervals CSV, by ``trace_id`` (see the module docstring for ``value``)."""
    path = path if path is not None else data_dir() / INTERVALS_FILE
    raw: dict[str, tuple[str, list[tuple[float, float, bool]]]] = {}
    for line, row in enumerate(_rows(path), start=2):
        try:
            nodes, value = int(row["nodes"]), int(row["value"])
            start, end = float(row["start_s"]), float(row["end_s"])
        except ValueError as exc:
            raise SpotTraceError(f"{path}:{line}: {exc}") from None
        up = value == 0 if nodes == 1 else value >= 1
        raw.setdefault(row["trace_id"], (row["zone"], []))[1].append((start, end, up))
    out = {}
    for tid, (zone, intervals) in raw.items():
        intervals.sort()
        starts: list[float] = []
        ups: list[bool] = []
        for start, _, up in intervals:
            if ups and ups[-1] == up:
                continue
            starts.append(start - intervals[0][0])
            ups.append(up)
        period = intervals[-1][1] - intervals[0][0]
        out[tid] = SpotTrace(name=tid, zone=zone, starts=tuple(starts), up=tuple(ups), period_s=period)
    return out


def find_spot_trace(name: str, traces: Mapping[str, SpotTrace]) -> SpotTrace:
    """The trace whose id is ``name``, or the only one whose id contains it; :class:`SpotTraceError` else."""
    if name in traces:
        return traces[name]
    hits = sorted(t for t in traces if name in t)
    if len(hits) == 1:
        return traces[hits[0]]
    known = ", ".join(sorted(traces)[:8]) + (" ..." if len(traces) > 8 else "")
    if not hits:
        raise SpotTraceError(f"no spot trace matches {name!r}; known: {known}")
    raise SpotTraceError(f"spot trace {name!r} is ambiguous: {', '.join(hits[:6])}")


def map_spot_pools(fleet: ModelFleet, traces: Mapping[str, SpotTrace], name: str | None = None, *,
                   offset_s: float = 0.0, cyclic: bool = True) -> dict[str, SpotTrace]:
    """A trace per spot pool of ``fleet`` (see the module docstring); pools without one are left out."""
    spot_pools = [p for p in fleet.pools if p.tier == "spot"]
    if name is not None:
        chosen = find_spot_trace(name, traces).at(offset_s, cyclic=cyclic)
        return {p.name: chosen for p in spot_pools}
    out: dict[str, SpotTrace] = {}
    used: set[str] = set()

    def rank(tid: str) -> tuple[bool, bool, str]:
        return (not tid.startswith("availability/"), "/1-node/" not in tid, tid)

    for p in spot_pools:
        cands = sorted((t for t, tr in traces.items() if tr.zone.startswith(p.region)), key=rank)
        if not cands:
            continue
        fresh = [t for t in cands if traces[t].zone not in used] or cands
        pick = traces[fresh[0]]
        used.add(pick.zone)
        out[p.name] = pick.at(offset_s, cyclic=cyclic)
    return out
