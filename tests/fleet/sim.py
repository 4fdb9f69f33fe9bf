"""A tiny fleet for driving a policy in tests: replicas serve a demand and report engine samples.

Each replica serves up to its pool's ``tokens_per_s`` (1000 if unset); demand above the fleet's capacity
waits (engine queues); with no replica, requests wait in the gateway's queue. A decision is applied at
once: new replicas report from the next tick; drained and surplus replicas stop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from skyfleet.cost.catalog import Catalog
from skyfleet.engines.metrics import Histogram
from skyfleet.fleet.policy import load_policy
from skyfleet.fleet.policy.base import Decision, PolicyState
from skyfleet.fleet.policy.signals import QueueSample, ReplicaSample, SignalWindow
from skyfleet.fleet.spec import ModelFleet

BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, math.inf)
CATALOG = Catalog.builtin()


@dataclass(frozen=True)
class Load:
    demand_tps: float = 0.0
    queue: int = 0  # extra requests in the gateway's queue
    ttft_s: float = 0.04  # latency every request observes this tick
    tpot_s: float = 0.02


@dataclass
class Replica:
    id: str
    pool: str
    generated: float = 0.0
    ttft: list[float] = field(default_factory=lambda: [0.0] * len(BOUNDS))
    tpot: list[float] = field(default_factory=lambda: [0.0] * len(BOUNDS))


def _observe(counts: list[float], value: float, n: float) -> None:
    for i, le in enumerate(BOUNDS):
        if value <= le:
            counts[i] += n
            return


def _hist(counts: list[float]) -> Histogram:
    cumulative, total = [], 0.0
    for c in counts:
        total += c
        cumulative.append(total)
    return Histogram(tuple(zip(BOUNDS, cumulative, strict=True)), 0.0, total)


@dataclass
class Step:
    at: float
    before: dict[str, int]
    decision: Decision


class FleetSim:
    def __init__(self, spec: ModelFleet, start: float, *, replicas: dict[str, int] | None = None) -> None:
        self.spec = spec
        self.now = start
        self.window = SignalWindow(horizon_s=7200, max_samples=4096)
        self.policy = load_policy(spec.policy)
        self.state = PolicyState()
        self.replicas: dict[str, Replica] = {}
        self.seq = 0
        self.steps: list[Step] = []
        for pool, n in (replicas or {}).items():
            for _ in range(n):
                self._start(pool)

    def _start(self, pool: str) -> None:
        self.seq += 1
        rid = f"{pool}-{self.seq}"
        self.replicas[rid] = Replica(rid, pool)

    def counts(self) -> dict[str, int]:
        return {p.name: sum(1 for r in self.replicas.values() if r.pool == p.name) for p in self.spec.pools}

    def capacity(self, pool: str) -> float:
        return self.spec.pool(pool).tokens_per_s or 1000.0

    def observe(self, load: Load, dt: float) -> None:
        """``dt`` seconds of ``load`` on the current replicas, then one scrape of each."""
        reps = list(self.replicas.values())
        total_cap = sum(self.capacity(r.pool) for r in reps)
        served = min(load.demand_tps, total_cap)
        excess = max(0.0, load.demand_tps - total_cap)
        for r in reps:
            cap = self.capacity(r.pool)
            share = served * cap / total_cap if total_cap else 0.0
            r.generated += share * dt
            if share > 0:
                _observe(r.ttft, load.ttft_s, 10)
                _observe(r.tpot, load.tpot_s, 100)
            waiting = math.ceil(excess / total_cap * 4) if excess else 0
            self.window.add(ReplicaSample(self.now, r.id, r.pool, running=share / cap * 8, waiting=waiting,
                                          generation_tokens_total=r.generated, prompt_tokens_total=r.generated,
                                          ttft=_hist(r.ttft), tpot=_hist(r.tpot)))
        queued = load.queue + (1 if not reps and load.demand_tps > 0 else 0)
        self.window.add_queue(QueueSample(self.now, queued))

    def decide(self) -> Decision:
        before = self.counts() if self.state.desired is None else dict(self.state.desired)
        decision, self.state = self.policy.decide(self.spec, self.window.snapshot(self.now), CATALOG, self.now,
                                                  self.state)
        self.steps.append(Step(self.now, before, decision))
        return decision

    def apply(self, decision: Decision) -> None:
        for rid in decision.drain:
            self.replicas.pop(rid, None)
            self.window.forget(rid)
        for pool, want in decision.desired.items():
            mine = sorted((r.id for r in self.replicas.values() if r.pool == pool), key=lambda i: int(i.split("-")[-1]))
            for rid in mine[want:][::-1]:
                self.replicas.pop(rid)
                self.window.forget(rid)
            for _ in range(want - len(mine)):
                self._start(pool)

    def step(self, load: Load, dt: float = 10.0) -> Decision:
        self.now += dt
        self.observe(load, dt)
        decision = self.decide()
        self.apply(decision)
        return decision

    def restart(self) -> None:
        """A controller restart: the state comes back from its persisted JSON."""
        self.state = PolicyState.from_json(json.loads(json.dumps(self.state.to_json())))

    def totals(self) -> list[int]:
        return [s.decision.total for s in self.steps]
