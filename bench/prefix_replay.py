"""Prefix-cache hits and load balance of routing policies, replaying the Mooncake FAST'25 traces.

    .venv/bin/python bench/prefix_replay.py            # ~15 s; writes bench/results/prefix_replay.{md,json}
    .venv/bin/python bench/prefix_replay.py --quick    # the default cache size only

Data: Mooncake FAST'25 traces (kvcache-ai/Mooncake, ``FAST25-release/traces``, Apache-2.0; cite
the Mooncake FAST'25 paper), converted to gzip CSV in /work/shared/data (see its README,
section 2). Each request has an arrival time, input/output token counts and ``hash_ids``: the
prompt's 512-token prefix blocks, where equal leading ids mean a shareable KV-cache prefix.
The main run uses the synthetic multi-turn trace (Poisson arrivals, real turn order); the
real-traffic conversation trace is replayed too, as a cross-check.

Only the routing policy is real (the skyfleet classes, called with the same snapshots the
gateway builds); replicas are modelled:

* Prefix cache: each replica has an LRU of C blocks (``skyfleet.engines.sim.prefix_cache``).
  A request's hit is the longest prefix of its ``hash_ids`` cached on the chosen replica
  (full blocks x 512 tokens; a request whose every block hits counts its whole
  ``input_length``); then all its blocks are inserted. Blocks are cached at routing time.
* Service: ``slots`` parallel sequences per replica (FIFO queue beyond that); a request holds
  a slot for ``uncached_tokens / prefill_rate + output_length * tpot`` seconds. TTFT = queue
  wait + its prefill time. The gateway's ``outstanding`` (running + queued) and the slot count
  (``capacity``) are what the policies see, so the bounded-load rule has real load to bound.
* Ideal: one infinite cache shared by all requests (no routing, no eviction): the upper bound
  every policy is compared with. "Pooled LRU" is one LRU of 8 x C blocks, i.e. what the same
  memory would give if it were a single shared cache.
* One tenant (the trace has none), so the tenant part of the key is constant.

Session key: the trace has no session ids, so the key is derived from the prompt like a
gateway would (``PrefixAffinity.key_for_blocks``): the first block after the prefix that all
traffic shares (a global system prompt). The shared prefix is measured from the data: the
leading positions where one block id occurs in at least half of all requests (none in the
synthetic trace, block 0 in the conversation trace). Requests with no block beyond it get no
key and go least-outstanding.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import heapq
import json
import math
import platform
import statistics
import sys
import time
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyfleet.engines.sim.prefix_cache import PrefixCache
from skyfleet.routing.affinity import PrefixAffinity, SessionAffinity, affinity_hash, prefix_key
from skyfleet.routing.least_load import LeastOutstandingRequests
from skyfleet.routing.policy import ReplicaLoad, RouteRequest, RoutingSnapshot

ROOT = Path(__file__).resolve().parent.parent  # skyfleet comes from the venv (editable install)
DATA = Path("/work/shared/data")
TRACES = {
    "synthetic": DATA / "mooncake_fast25_synthetic_trace.csv.gz",
    "conversation": DATA / "mooncake_fast25_conversation_trace.csv.gz",
}
BLOCK_TOKENS = 512
TENANT, MODEL = "mooncake", "trace-model"
TARGET_FRACTION, TARGET_IMBALANCE = 0.90, 1.25


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Req:
    idx: int
    t: float  # seconds
    input_length: int
    output_length: int
    blocks: tuple[int, ...]


def load_trace(path: Path) -> list[Req]:
    with gzip.open(path, "rt", newline="") as f:
        reqs = [
            Req(
                idx=int(row["request_idx"]),
                t=int(row["timestamp_ms"]) / 1000.0,
                input_length=int(row["input_length"]),
                output_length=int(row["output_length"]),
                blocks=tuple(int(x) for x in row["hash_ids"].split()),
            )
            for row in csv.DictReader(f)
        ]
    reqs.sort(key=lambda r: (r.t, r.idx))
    return reqs


def hit_tokens(req: Req, hit_blocks: int) -> int:
    return req.input_length if hit_blocks >= len(req.blocks) else hit_blocks * BLOCK_TOKENS


# --- the data: shared prefix, key groups, ideal hits --------------------------------------------


def shared_prefix_len(reqs: list[Req], share: float = 0.5) -> int:
    """Leading positions where a single block id occurs in at least ``share`` of all requests."""
    n = 0
    while True:
        ids = Counter(r.blocks[n] for r in reqs if len(r.blocks) > n)
        if not ids or ids.most_common(1)[0][1] < share * len(reqs):
            return n
        n += 1


def ideal_infinite(reqs: list[Req]) -> int:
    seen: set[int] = set()
    total = 0
    for r in reqs:
        k = 0
        while k < len(r.blocks) and r.blocks[k] in seen:
            k += 1
        total += hit_tokens(r, k)
        seen.update(r.blocks)
    return total


def key_partitioned_infinite(reqs: list[Req], keys: list[str | None], shared: frozenset[int]) -> int:
    """Hits if each key group had its own infinite cache (the shared prefix is cached everywhere
    once seen): the ceiling of any key-based affinity, whatever the load bound."""
    groups: dict[str | None, set[int]] = {}
    seen_shared: set[int] = set()
    total = 0
    for r, key in zip(reqs, keys, strict=True):
        group = groups.setdefault(key, set())
        k = 0
        while k < len(r.blocks) and (r.blocks[k] in group or r.blocks[k] in seen_shared):
            k += 1
        total += hit_tokens(r, k)
        group.update(r.blocks)
        seen_shared.update(b for b in r.blocks if b in shared)
    return total


def pooled_lru(reqs: list[Req], capacity: int) -> int:
    cache = PrefixCache(capacity)
    total = 0
    for r in reqs:
        total += hit_tokens(r, cache.match(r.blocks))
        cache.insert(r.blocks)
    return total


# --- policies ---------------------------------------------------------------------------------


class RoundRobin:
    def choose(self, snapshot: RoutingSnapshot, request: RouteRequest) -> str | None:
        cands = [r for r in snapshot.replicas if r.replica_id not in request.exclude]
        return cands[snapshot.seq % len(cands)].replica_id if cands else None


@dataclass(frozen=True)
class PolicySpec:
    name: str
    make: Any  # () -> policy
    keyed: int = 0  # prefix blocks of the session key; 0: no key
    affinity: bool = False


def policy_specs() -> list[PolicySpec]:
    return [
        PolicySpec("round-robin", RoundRobin),
        PolicySpec("least-outstanding", LeastOutstandingRequests),
        PolicySpec("affinity c=1.1", lambda: PrefixAffinity(1, load_factor=1.1), 1, True),
        PolicySpec("affinity c=1.25", lambda: PrefixAffinity(1, load_factor=1.25), 1, True),
        PolicySpec("affinity c=1.5", lambda: PrefixAffinity(1, load_factor=1.5), 1, True),
        PolicySpec("affinity c=1.75", lambda: PrefixAffinity(1, load_factor=1.75), 1, True),
        PolicySpec("affinity c=2.0", lambda: PrefixAffinity(1, load_factor=2.0), 1, True),
        PolicySpec("affinity c=1.25, key=2 blocks", lambda: PrefixAffinity(2, load_factor=1.25), 2, True),
        PolicySpec("consistent hash, no bound", lambda: PrefixAffinity(1, load_factor=1e6), 1, True),
    ]


# --- the replay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    replicas: int
    slots: int
    prefill_rate: float  # tokens/s
    tpot: float  # s per output token


def simulate(
    reqs: list[Req], keys: list[str | None], policy: Any, cache_blocks: int, model: Model
) -> dict[str, Any]:
    n, slots = model.replicas, model.slots
    names = [f"replica-{i}" for i in range(n)]
    index = {name: i for i, name in enumerate(names)}
    caches = [PrefixCache(cache_blocks) for _ in range(n)]
    ring = policy.ring(frozenset(names)) if isinstance(policy, SessionAffinity) else None
    spilled = 0  # keyed requests not sent to their key's first replica on the ring
    out = [0] * n  # outstanding: running + queued
    running = [0] * n
    queues: list[deque[tuple[float, float, float]]] = [deque() for _ in range(n)]
    heap: list[tuple[float, int, int]] = []
    area = [0.0] * n  # integral of outstanding over time
    last = [0.0] * n
    busy = [0.0] * n  # slot-seconds of work
    assigned = [0] * n
    hits = 0
    ttft: list[float] = []
    order = 0

    def advance(i: int, t: float) -> None:
        area[i] += out[i] * (t - last[i])
        last[i] = t

    def start(i: int, t: float, job: tuple[float, float, float]) -> None:
        nonlocal order
        arrival, prefill, service = job
        running[i] += 1
        ttft.append(t - arrival + prefill)
        order += 1
        heapq.heappush(heap, (t + service, order, i))

    def finish_until(t: float) -> None:
        while heap and heap[0][0] <= t:
            f, _, i = heapq.heappop(heap)
            advance(i, f)
            out[i] -= 1
            running[i] -= 1
            if queues[i]:
                start(i, f, queues[i].popleft())

    for r, key in zip(reqs, keys, strict=True):
        finish_until(r.t)
        snap = RoutingSnapshot(
            now=r.t,
            replicas=tuple(ReplicaLoad(names[i], out[i], capacity=slots) for i in range(n)),
            seq=r.idx,
        )
        choice = policy.choose(snap, RouteRequest(TENANT, MODEL, session_key=key))
        i = index[choice]
        if ring is not None and key:
            first = ring.owners[bisect_left(ring.points, affinity_hash(TENANT, key)) % len(ring.points)]
            spilled += ring.ids[first] != choice
        h = hit_tokens(r, caches[i].match(r.blocks))
        caches[i].insert(r.blocks)
        hits += h
        prefill = (r.input_length - h) / model.prefill_rate
        service = prefill + r.output_length * model.tpot
        busy[i] += service
        advance(i, r.t)
        out[i] += 1
        assigned[i] += 1
        job = (r.t, prefill, service)
        if running[i] < slots:
            start(i, r.t, job)
        else:
            queues[i].append(job)
    finish_until(math.inf)
    end = max(last)
    for i in range(n):
        advance(i, end)

    def imbalance(xs: list[float] | list[int]) -> float:
        mean = sum(xs) / len(xs)
        return max(xs) / mean if mean else 1.0

    ttft.sort()
    return {
        "hit_tokens": hits,
        "assigned": assigned,
        "imbalance_requests": imbalance(assigned),
        "imbalance_outstanding_time_avg": imbalance(area),
        "imbalance_busy": imbalance(busy),
        "mean_outstanding": sum(area) / end / n,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "utilisation": sum(busy) / (end * n * slots),
        "spilled_fraction": spilled / len(reqs) if ring is not None else None,
    }


def choose_micro_us(repeats: int = 20_000) -> dict[str, float]:
    """Mean time of one choose() with 8 replicas (warm ring), next to least-outstanding."""
    reps = tuple(ReplicaLoad(f"replica-{i}", outstanding=(i * 7) % 5, capacity=4) for i in range(8))
    snap = RoutingSnapshot(now=0.0, replicas=reps, seq=3)
    reqs = [RouteRequest(TENANT, MODEL, session_key=f"session-{i}") for i in range(repeats)]
    result = {}
    for name, pol in (("affinity", PrefixAffinity(1)), ("least-outstanding", LeastOutstandingRequests())):
        pol.choose(snap, reqs[0])
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for rq in reqs:
                pol.choose(snap, rq)
            best = min(best, (time.perf_counter() - t0) / repeats * 1e6)
        result[name] = best
    return result


# --- one trace --------------------------------------------------------------------------------

SCALES = (1, 4, 16)  # concurrency sweep: arrivals s x faster, s x the slots (same utilisation)
SCALE_POLICIES = ("least-outstanding", "affinity c=1.1", "affinity c=1.25", "affinity c=1.5")


def auto_slots(reqs: list[Req], model: Model, utilisation: float = 0.75) -> int:
    """Slots per replica so that the work with no cache hits at all fills ``utilisation`` of them."""
    span = reqs[-1].t - reqs[0].t
    work = sum(r.input_length / model.prefill_rate + r.output_length * model.tpot for r in reqs)
    return max(1, math.ceil(work / span / (utilisation * model.replicas)))


def run_policy(
    spec: PolicySpec,
    reqs: list[Req],
    keys_by_k: dict[int, list[str | None]],
    size: int,
    model: Model,
    ideal: int,
    total_tokens: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    keys = keys_by_k[spec.keyed] if spec.keyed else [None] * len(reqs)
    res = simulate(reqs, keys, spec.make(), size, model)
    res.update(
        policy=spec.name,
        cache_blocks=size,
        slots=model.slots,
        hit_ratio=res["hit_tokens"] / total_tokens,
        of_ideal=res["hit_tokens"] / ideal,
        affinity=spec.affinity,
        wall_s=time.perf_counter() - t0,
    )
    return res


def run_trace(
    name: str, sizes: list[str], model: Model, progress: list[int], scales: tuple[int, ...]
) -> dict[str, Any]:
    path = TRACES[name]
    reqs = load_trace(path)
    if not model.slots:
        model = Model(model.replicas, auto_slots(reqs, model), model.prefill_rate, model.tpot)
    skip = shared_prefix_len(reqs)
    shared = frozenset(b for r in reqs for b in r.blocks[:skip])
    distinct = len({b for r in reqs for b in r.blocks})
    total_tokens = sum(r.input_length for r in reqs)
    ideal = ideal_infinite(reqs)
    keys_by_k = {k: [prefix_key(r.blocks, k, skip) for r in reqs] for k in (1, 2)}
    groups = {k: Counter(v) for k, v in keys_by_k.items()}
    ceiling = {k: key_partitioned_infinite(reqs, keys_by_k[k], shared) / ideal for k in (1, 2)}
    span = reqs[-1].t - reqs[0].t
    stats = {
        "requests": len(reqs),
        "span_s": span,
        "arrival_rate_per_s": len(reqs) / span,
        "mean_input_tokens": total_tokens / len(reqs),
        "mean_output_tokens": statistics.fmean(r.output_length for r in reqs),
        "block_refs": sum(len(r.blocks) for r in reqs),
        "distinct_blocks": distinct,
        "shared_prefix_blocks": skip,
        "key_groups": {f"{k}_blocks": len(g) for k, g in groups.items()},
        "keyless_requests": groups[1].get(None, 0),
        "largest_key_group_share": max(c for k, c in groups[1].items() if k is not None) / len(reqs),
        "ideal_hit_ratio": ideal / total_tokens,
        "key_ceiling_of_ideal": {f"{k}_blocks": v for k, v in ceiling.items()},
    }
    cache_sizes = [math.ceil(distinct / model.replicas) if s == "distinct/8" else int(s) for s in sizes]
    runs: list[dict[str, Any]] = []

    def note(res: dict[str, Any], extra: str = "") -> None:
        progress[0] += 1
        log(
            f"[{progress[0]}/{progress[1]}] {name} C={res['cache_blocks']}{extra} {res['policy']}: "
            f"hit {res['hit_ratio']:.1%} ({res['of_ideal']:.1%} of ideal), imbalance req "
            f"{res['imbalance_requests']:.2f} outstanding {res['imbalance_outstanding_time_avg']:.2f} "
            f"({res['wall_s']:.1f}s)"
        )

    for size in cache_sizes:
        pooled = pooled_lru(reqs, size * model.replicas)
        runs.append(
            {
                "policy": f"pooled LRU ({model.replicas} x C, no routing)",
                "cache_blocks": size,
                "hit_ratio": pooled / total_tokens,
                "of_ideal": pooled / ideal,
            }
        )
        for spec in policy_specs():
            res = run_policy(spec, reqs, keys_by_k, size, model, ideal, total_tokens)
            runs.append(res)
            note(res)
    scaled: list[dict[str, Any]] = []
    for scale in scales:
        fast = [Req(r.idx, r.t / scale, r.input_length, r.output_length, r.blocks) for r in reqs]
        m = Model(model.replicas, model.slots * scale, model.prefill_rate, model.tpot)
        for spec in policy_specs():
            if spec.name in SCALE_POLICIES:
                res = run_policy(spec, fast, keys_by_k, cache_sizes[0], m, ideal, total_tokens)
                res["scale"] = scale
                scaled.append(res)
                note(res, f" x{scale}")
    return {
        "trace": name,
        "path": str(path),
        "model": model.__dict__,
        "stats": stats,
        "cache_sizes": cache_sizes,
        "runs": runs,
        "concurrency_sweep": scaled,
    }


# --- report -----------------------------------------------------------------------------------


def meets_target(r: dict[str, Any]) -> bool:
    return (
        r["of_ideal"] >= TARGET_FRACTION
        and r["imbalance_requests"] <= TARGET_IMBALANCE
        and r["imbalance_outstanding_time_avg"] <= TARGET_IMBALANCE
    )


def fmt_table(result: dict[str, Any], size: int) -> list[str]:
    st = result["stats"]
    lines = [
        "| policy | hit ratio | % of ideal | req max/mean | outstanding max/mean (time-avg) | busy max/mean "
        "| mean TTFT s | p99 TTFT s | spilled | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
        f"| ideal: one infinite cache | {st['ideal_hit_ratio']:.1%} | 100% | | | | | | | |",
    ]
    for r in result["runs"]:
        if r["cache_blocks"] != size:
            continue
        if "assigned" not in r:
            lines.append(f"| {r['policy']} | {r['hit_ratio']:.1%} | {r['of_ideal']:.1%} | | | | | | | |")
            continue
        target = ("met" if meets_target(r) else "missed") if r["affinity"] else ""
        lines.append(
            f"| {r['policy']} | {r['hit_ratio']:.1%} | {r['of_ideal']:.1%} | {r['imbalance_requests']:.2f} "
            f"| {r['imbalance_outstanding_time_avg']:.2f} | {r['imbalance_busy']:.2f} "
            f"| {r['ttft_mean_s']:.2f} | {r['ttft_p99_s']:.2f} "
            f"| {'' if r['spilled_fraction'] is None else format(r['spilled_fraction'], '.1%')} | {target} |"
        )
    return lines


def _cell(r: dict[str, Any]) -> str:
    if "assigned" not in r:
        return f"{r['of_ideal']:.1%}"
    return f"{r['of_ideal']:.1%} ({r['imbalance_requests']:.2f}, {r['imbalance_outstanding_time_avg']:.2f})"


def fmt_sweep(result: dict[str, Any]) -> list[str]:
    sizes = result["cache_sizes"]
    lines = [
        "| policy | " + " | ".join(f"C = {s:,}" for s in sizes) + " |",
        "| --- |" + " ---: |" * len(sizes),
    ]
    for name in dict.fromkeys(r["policy"] for r in result["runs"]):
        cells = [
            _cell(next(x for x in result["runs"] if x["policy"] == name and x["cache_blocks"] == s))
            for s in sizes
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def fmt_scales(result: dict[str, Any]) -> list[str]:
    rows = result["concurrency_sweep"]
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    lines = [
        "| policy | "
        + " | ".join(
            f"x{s}: {next(r for r in rows if r['scale'] == s)['slots']} slots, "
            f"~{statistics.fmean(r['mean_outstanding'] for r in rows if r['scale'] == s):.0f} outstanding/replica"
            for s in scales
        )
        + " |",
        "| --- |" + " ---: |" * len(scales),
    ]
    for name in dict.fromkeys(r["policy"] for r in rows):
        cells = []
        for s in scales:
            r = next(x for x in rows if x["policy"] == name and x["scale"] == s)
            cells.append(_cell(r) + (" met" if r["affinity"] and meets_target(r) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_md(results: list[dict[str, Any]], micro: dict[str, float], wall: float) -> str:
    main = results[0]
    st = main["stats"]
    model = Model(**main["model"])
    default = main["cache_sizes"][0]
    best = [r for r in main["runs"] if r["cache_blocks"] == default and r.get("affinity") and meets_target(r)]
    by_name = {r["policy"]: r for r in main["runs"] if r["cache_blocks"] == default}
    a125 = by_name["affinity c=1.25"]
    lor = by_name["least-outstanding"]
    unbounded = by_name["consistent hash, no bound"]
    scale125 = next(
        (
            r["scale"]
            for r in main["concurrency_sweep"]
            if r["policy"] == "affinity c=1.25" and meets_target(r)
        ),
        None,
    )
    met_here = ", ".join(f"`{r['policy']}`" for r in best) or "no load factor tried"
    verdict = (
        f"At the trace's own load (~{a125['mean_outstanding']:.1f} requests outstanding per replica) "
        f"SessionAffinity(c=1.25) keeps {a125['of_ideal']:.0%} of the ideal hits "
        f"({a125['hit_ratio']:.1%} of input tokens vs {lor['hit_ratio']:.1%} for least-outstanding) at "
        f"{a125['imbalance_requests']:.2f} / {a125['imbalance_outstanding_time_avg']:.2f} imbalance, and cuts "
        f"mean TTFT to {a125['ttft_mean_s']:.2f} s from {lor['ttft_mean_s']:.2f} s; it "
        + ("meets" if meets_target(a125) else "misses")
        + f" the {TARGET_FRACTION:.0%}-of-ideal target. With so few requests per replica the bound "
        "ceil(c x mean) is a small integer, ordinary fluctuation pushes a session's replica over it, and "
        f"a spilled request usually lands on a replica without its prefix. At this load the target is met by {met_here} "
        "(check the outstanding column: a value just under the limit is luck, not margin). "
        + (
            f"c=1.25 meets it at x{scale125} concurrency (concurrency sweep below). "
            if scale125
            else "c=1.25 meets it at none of the concurrencies swept. "
        )
        + "Higher c buys "
        "hits with queueing: mean TTFT rises with c. Without a bound (plain consistent hashing) hits are "
        f"{unbounded['of_ideal']:.1%} of ideal but the hottest replica holds "
        f"{unbounded['imbalance_outstanding_time_avg']:.1f}x the mean outstanding load and p99 TTFT is "
        f"{unbounded['ttft_p99_s']:.0f} s."
    )
    out = [
        "# Prefix-cache affinity: replaying the Mooncake FAST'25 traces",
        "",
        "Written by `bench/prefix_replay.py` (pure Python, no GPU; "
        f"{platform.python_implementation()} {platform.python_version()}, whole run {wall:.0f} s).",
        "",
        "**Data.** Mooncake FAST'25 traces from [kvcache-ai/Mooncake](https://github.com/kvcache-ai/Mooncake) "
        "(`FAST25-release/traces/`, Apache-2.0; please cite the Mooncake FAST'25 paper), converted to CSV in "
        "`/work/shared/data` (README section 2). Main run: `mooncake_fast25_synthetic_trace.csv.gz` "
        f"({st['requests']:,} requests over {st['span_s']:.0f} s, {st['arrival_rate_per_s']:.2f} req/s, "
        "Poisson arrivals with real turn order; mean input "
        f"{st['mean_input_tokens']:,.0f} tokens, output {st['mean_output_tokens']:.0f}).",
        "",
        "**Model.** Only the policies are real (skyfleet's classes, fed the snapshots a gateway builds). "
        f"{model.replicas} replicas, each with an LRU prefix cache of C blocks of 512 tokens and "
        f"{model.slots} slots (`capacity`, sized so that the work with no cache hits would fill 75% of them); "
        f"a request holds a slot for uncached_tokens / {model.prefill_rate:,.0f} tok/s + output_tokens x "
        f"{model.tpot * 1000:.0f} ms (roughly an 8B model on one H100-class GPU); beyond the slots requests "
        "queue FIFO. Hit = longest cached prefix of the request's `hash_ids` on the chosen replica (full "
        "blocks x 512 tokens, the whole `input_length` if every block hits); its blocks are then cached. "
        "Hit ratio = hit tokens / all input tokens. *Ideal* = one infinite cache shared by all requests. "
        "*Pooled LRU* = one shared LRU of 8 x C blocks (the same memory as one cache). Imbalance = max/mean "
        "over replicas of requests assigned (*req*), of time-averaged outstanding requests (*outstanding*), "
        "and of busy slot-seconds (*busy*). TTFT = queue wait + own prefill time. *Spilled* = share of "
        "requests the load bound sent past their key's first replica on the ring.",
        "",
        "**Session key.** The trace has no session ids; the key is derived from the prompt as a gateway "
        "would (`PrefixAffinity.key_for_blocks`): the first block after the prefix that all traffic shares. "
        "The shared prefix is measured (leading positions where one block id is in >= 50% of requests): "
        f"{st['shared_prefix_blocks']} blocks in the synthetic trace, whose first blocks already name "
        f"{st['key_groups']['1_blocks']:,} distinct conversations/documents (the largest is "
        f"{st['largest_key_group_share']:.1%} of requests), so the key is block 0 itself. Any prefix hit "
        "needs the same block 0, so this key puts every reusable prefix in one group: a per-key infinite "
        f"cache reaches {st['key_ceiling_of_ideal']['1_blocks']:.2%} of ideal. Keying on the first 2 blocks "
        f"makes {st['key_groups']['2_blocks']:,} groups (ceiling "
        f"{st['key_ceiling_of_ideal']['2_blocks']:.2%}) and gains nothing (row *key=2 blocks*). In the "
        "conversation trace block 0 is in every request, and the same rule skips it (below).",
        "",
        f"## Synthetic trace, C = {default:,} blocks per replica",
        "",
        f"C = ceil(distinct blocks / 8) = ceil({st['distinct_blocks']:,} / 8): the 8 caches together could hold "
        f"every block of the trace, so routing rather than capacity decides the hits ({default:,} blocks = "
        f"{default * 512 / 1e6:.1f} M tokens, ~{default * 512 * 128 / 2**20:.0f} GiB of KV for a "
        "Llama-3-8B-like model at 128 KiB/token: HBM plus a DRAM tier, as in Mooncake). "
        f"Target: an affinity policy at >= {TARGET_FRACTION:.0%} of ideal with req and outstanding "
        f"imbalance <= {TARGET_IMBALANCE}.",
        "",
        *fmt_table(main, default),
        "",
        verdict,
        "",
        "## Cache-size sweep (synthetic)",
        "",
        "% of ideal, with (req, outstanding) max/mean. 1,024 blocks (0.5 M tokens, ~64 GiB of KV for an 8B "
        "model) is about what one 80 GB GPU holds without a DRAM tier; there capacity caps every policy: "
        "even one pooled LRU of all 8 caches' memory keeps only part of the ideal hits.",
        "",
        *fmt_sweep(main),
        "",
        "## Concurrency sweep (synthetic)",
        "",
        f"C = {default:,}. Arrivals s times faster and s times the slots: the same utilisation and cache "
        "traffic, s times more requests in flight per replica (as with a batching engine such as vLLM "
        "instead of a few llama.cpp slots). % of ideal with (req, outstanding) max/mean; *met* marks the "
        "target.",
        "",
        *fmt_scales(main),
        "",
    ]
    for extra in results[1:]:
        xs = extra["stats"]
        size = extra["cache_sizes"][0]
        xm = extra["model"]
        out += [
            f"## Cross-check: {extra['trace']} trace (real Kimi traffic), C = {size:,}",
            "",
            f"{xs['requests']:,} requests over {xs['span_s']:.0f} s ({xs['arrival_rate_per_s']:.2f} req/s, "
            f"mean input {xs['mean_input_tokens']:,.0f} tokens, output {xs['mean_output_tokens']:.0f}); "
            f"{xm['slots']} slots per replica by the same 75% rule, C = ceil(distinct / 8). Every request "
            f"starts with block 0 (measured shared prefix: {xs['shared_prefix_blocks']} block), so the key is "
            f"the first block after it: {xs['key_groups']['1_blocks']:,} groups, {xs['keyless_requests']} "
            f"keyless requests, the largest {xs['largest_key_group_share']:.1%}. Only "
            f"{xs['ideal_hit_ratio']:.1%} of input tokens can hit even in the ideal cache; per-key ceiling "
            f"{xs['key_ceiling_of_ideal']['1_blocks']:.2%} of ideal.",
            "",
            *fmt_table(extra, size),
            "",
        ]
    out += [
        "## Policy cost",
        "",
        f"One `choose()` with 8 replicas, warm ring: SessionAffinity {micro['affinity']:.1f} us, "
        f"least-outstanding {micro['least-outstanding']:.1f} us (best of 3 x 20,000 calls, this machine). "
        "Building a ring (8 replicas x 160 points) takes about 2 ms, once per replica set.",
        "",
        "## Caveats",
        "",
        "- Simulated replicas: fixed prefill rate and TPOT independent of batch size; blocks are cached when "
        "the request is routed, not when its prefill ends; decode tokens do not take cache space.",
        "- The synthetic trace's arrivals are Poisson-generated (only the turn order is real), so turns of one "
        "conversation can overlap in time; one tenant sends everything (the trace has no tenants).",
        "- Hits on the real conversation trace are bounded by the data itself: most requests share only "
        "block 0 with anything else.",
        "- 160 virtual nodes per replica leave the ring's key shares of 8 replicas between about 0.84 and "
        "1.16 of the mean (the affinity rows' request imbalance partly comes from this); the load bound "
        "caps it, and more vnodes (e.g. 1,000) narrow it at a one-off ring-build cost.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument(
        "--slots", type=int, default=0, help="parallel sequences per replica; 0: fill 75%% without hits"
    )
    ap.add_argument("--prefill-rate", type=float, default=10_000.0, help="prefill tokens/s per replica")
    ap.add_argument("--tpot", type=float, default=0.030, help="seconds per output token")
    ap.add_argument(
        "--cache-blocks",
        nargs="+",
        default=["distinct/8", "1024", "2048", "4096"],
        help="per-replica LRU sizes in blocks; the first is the main table ('distinct/8' = ceil(distinct/8))",
    )
    ap.add_argument("--quick", action="store_true", help="first cache size only, no sweeps or cross-check")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix_replay")
    args = ap.parse_args()
    model = Model(args.replicas, args.slots, args.prefill_rate, args.tpot)
    sizes = args.cache_blocks[:1] if args.quick else args.cache_blocks
    scales = () if args.quick else SCALES
    plan = [("synthetic", sizes, scales)] + ([] if args.quick else [("conversation", sizes[:1], ())])
    per_scale = sum(spec.name in SCALE_POLICIES for spec in policy_specs())
    progress = [0, sum(len(s) * len(policy_specs()) + len(sc) * per_scale for _, s, sc in plan)]
    t0 = time.perf_counter()
    results = []
    for name, trace_sizes, trace_scales in plan:
        log(f"loading {name} trace")
        results.append(run_trace(name, trace_sizes, model, progress, trace_scales))
    log("timing choose()")
    micro = choose_micro_us()
    wall = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = render_md(results, micro, wall)
    args.out.with_suffix(".md").write_text(md)
    payload = {
        "generated_by": "bench/prefix_replay.py",
        "data_source": "Mooncake FAST'25 traces, kvcache-ai/Mooncake FAST25-release/traces (Apache-2.0)",
        "block_tokens": BLOCK_TOKENS,
        "target": {"fraction_of_ideal": TARGET_FRACTION, "max_imbalance": TARGET_IMBALANCE},
        "choose_us": micro,
        "wall_s": wall,
        "python": platform.python_version(),
        "traces": results,
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    log(f"wrote {args.out.with_suffix('.md')} and .json in {wall:.1f}s")
    print(md)


if __name__ == "__main__":
    main()
