"""Leak check: the gateway's RSS after 100,000 requests stays within 5% of its RSS after 10,000.

    .venv/bin/python bench/leak_check.py [--requests 100000]

Gateway pinned to CPU 0 (auth and request accounting on), simulated engine (--fast) and this load
generator on CPU 1. Writes bench/results/leak_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import ROOT, log, start_stack
from loadgen import LoadSpec, closed_loop
from procstat import memory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "leak_check.json")
    args = ap.parse_args()
    _, _, _, sims, gw, url, key = start_stack("skyfleet-leak-")
    points: list[dict[str, float]] = []
    try:
        done, step = 0, args.requests // 20
        t0 = time.monotonic()
        while done < args.requests:
            for stream in (False, True):
                spec = LoadSpec(url=url, key=key, model="sim-model", stream=stream, max_tokens=20)
                asyncio.run(closed_loop(spec, concurrency=64, requests=step // 2))
            done += step
            rss = memory(gw.pid).rss_mib
            points.append({"requests": done, "rss_mib": round(rss, 2)})
            log(f"{done:>7} requests  RSS {rss:.1f} MiB  ({time.monotonic() - t0:.0f} s)")
    finally:
        for p in (gw, *sims):
            p.terminate()
            p.wait(15)
    at_10k = next(p["rss_mib"] for p in points if p["requests"] >= args.requests // 10)
    final = points[-1]["rss_mib"]
    growth = (final - at_10k) / at_10k * 100
    result = {"points": points, "rss_at_10pct_mib": at_10k, "rss_final_mib": final,
              "growth_pct": round(growth, 2), "within_5pct": abs(growth) <= 5.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "points"}))
    return 0 if result["within_5pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
