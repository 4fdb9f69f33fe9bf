"""Four scaling policies on the whole Azure LLM conversation trace: cost and SLO attainment (issue #7).

    .venv/bin/python bench/planner_azure.py     # ~20-40 s on 2 cores; writes bench/results/planner_azure.md

Trace: Azure LLM inference trace 2023, conversation (Patel et al., "Splitwise", ISCA 2024; CC-BY 4.0),
19,366 requests over ~58 min (/work/shared/data/azure_llm_2023_conv.csv). Spot availability: SkyPilot spot
traces (Wu et al., "Can't Be Late", NSDI 2024), one 1-node availability trace per spot pool by region (see
``skyfleet.planner.spot``), from their start; V100 traces stand in for the L40S/A10G/L4 pools.

Serving: Llama-3.1-8B on vLLM, profiles from the built-in profile book (``planner/data/profiles.yaml``). SLO:
**TTFT p95 <= 2 s, TPOT p95 <= 0.1 s**. 0.1 s per token is 10 tokens/s, above reading speed (~4-5 words/s,
~6-7 tokens/s) so a streamed answer never stalls the reader; 2 s to the first token for ~1,000-token chat
prompts leaves room for queueing and a prefill on a mid-range GPU (L4: ~0.4 s for the mean prompt).

Fleet (us-east-1): g6e.xlarge (L40S) spot 0-8 and on-demand 1-8, g5.xlarge (A10G) spot 0-8, g6.xlarge (L4)
spot 0-8; on-demand floor 1; each pool's ``tokens_per_s`` = its replica's output tokens/s at the SLO from the
capacity model (``replica_capacity`` with the simulator's timing, ``prefill_interference=0``). Scaling knobs:
the spec defaults (window 60 s, up 30 s, down 300 s, cooldown 120 s, target utilisation 0.7). A second run
changes only the knobs named in the results ("tuned").

Goal (issue #7): skyfleet within 15% of the oracle's cost at >= 99% SLO attainment, and at most half the cost
of static-peak.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from skyfleet.cost.catalog import Catalog  # noqa: E402
from skyfleet.fleet.spec import ModelFleet  # noqa: E402
from skyfleet.planner.milp import PLANNED_SCALING  # noqa: E402
from skyfleet.planner.policies import compare, pool_capacities  # noqa: E402
from skyfleet.planner.profiles import ProfileBook  # noqa: E402
from skyfleet.planner.spot import data_dir, load_spot_traces, map_spot_pools  # noqa: E402
from skyfleet.planner.traces import load_trace  # noqa: E402

MODEL = "llama-3.1-8b"
SLO = {"ttft_p95_s": 2.0, "tpot_p95_s": 0.1}
POOLS = [
    {"name": "l40s-spot", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "spot", "max": 8},
    {"name": "l40s-od", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "on-demand", "min": 1,
     "max": 8},
    {"name": "a10g-spot", "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "spot", "max": 8},
    {"name": "l4-spot", "instance_type": "g6.xlarge", "region": "us-east-1", "tier": "spot", "max": 8},
]
TUNED = dict(PLANNED_SCALING)  # the knobs `skyfleet plan` writes (its tokens_per_s are capacities at the SLO)


def build(catalog: Catalog, trace: Any, scaling: dict[str, float] | None = None) -> tuple[ModelFleet, dict]:
    book = ProfileBook.builtin()
    base = {"engine": "vllm", "slo": SLO, "on_demand_floor": 1, "pools": [dict(p) for p in POOLS]}
    if scaling:
        base["scaling"] = scaling
    fleet = ModelFleet.model_validate(base, context={"catalog": catalog})
    profiles = {}
    for p in fleet.pools:
        prof = book.for_instance(catalog.get(p.instance_type, p.region), MODEL, "vllm")
        if prof is None:
            raise SystemExit(f"no profile for {MODEL} on {p.instance_type}")
        profiles[p.name] = prof
    caps = pool_capacities(trace, fleet, profiles)
    for p in base["pools"]:
        p["tokens_per_s"] = round(caps[p["name"]].output_tokens_per_s, 1)
    return ModelFleet.model_validate(base, context={"catalog": catalog}), profiles


def table(results: dict[str, Any]) -> list[str]:
    lines = ["| policy | $ | GPU-h | SLO attainment | TTFT p95 s | TPOT p95 s | preemptions | retried | drops |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lat = r.latency
        lines.append(f"| {name} | {r.cost_usd:.2f} | {r.gpu_hours:.2f} | {100 * (r.slo_met or 0):.2f}% | "
                     f"{lat['ttft_s']['p95']:.3f} | {lat['tpot_s']['p95']:.4f} | {r.preemptions} | {r.retried} | "
                     f"{r.dropped} |")
    return lines


def verdict(results: dict[str, Any]) -> str:
    sky, oracle, static = results["skyfleet"], results["oracle"], results["static-peak"]
    return (f"skyfleet / oracle cost: {sky.cost_usd / oracle.cost_usd:.3f} (goal <= 1.15); "
            f"skyfleet SLO attainment {100 * (sky.slo_met or 0):.2f}% (goal >= 99%); "
            f"skyfleet / static-peak cost: {sky.cost_usd / static.cost_usd:.3f} (goal <= 0.5)")


def main() -> None:
    catalog = Catalog.builtin()
    trace = load_trace(str(data_dir() / "azure_llm_2023_conv.csv"))
    out = ["# Capacity planner: four scaling policies on the Azure LLM conversation trace", "",
           f"Trace: {trace.name}, {len(trace)} requests over {trace.duration_s / 60:.1f} min. "
           f"SLO: TTFT p95 <= {SLO['ttft_p95_s']} s, TPOT p95 <= {SLO['tpot_p95_s']} s. "
           "Model llama-3.1-8b (vLLM profiles of the built-in book). See bench/planner_azure.py for the fleet.", ""]
    total_wall = 0.0
    for label, scaling in (("spec defaults", None), (f"as `skyfleet plan` writes them {TUNED}", TUNED)):
        fleet, profiles = build(catalog, trace, scaling)
        spot = map_spot_pools(fleet, load_spot_traces())
        started = time.perf_counter()
        results = compare(trace, fleet, profiles, catalog=catalog, spot=spot, processes=2, model_name=MODEL)
        wall = time.perf_counter() - started
        total_wall += wall
        out += [f"## Scaling knobs: {label}", "",
                f"Wall time for the 4 policies: {wall:.1f} s (2 processes; the oracle's search by simulation "
                "included).", "",
                "Pools' tokens_per_s (capacity model at the SLO): "
                + ", ".join(f"{p.name} {p.tokens_per_s:g}" for p in fleet.pools)
                + "; spot traces: " + ", ".join(f"{k} <- {v.name}" for k, v in spot.items()), "",
                *table(results), "", verdict(results), "",
                "Cost by pool: " + "; ".join(
                    f"{n}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.cost_by_pool.items() if v)
                    for n, r in results.items()), ""]
    print("\n".join(out))
    print(f"total wall time: {total_wall:.1f} s")
    path = ROOT / "bench" / "results" / "planner_azure.md"
    path.write_text("\n".join(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
