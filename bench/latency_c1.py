"""Added latency at concurrency 1, measured in repeated side-by-side rounds (direct vs skyfleet).

    .venv/bin/python bench/latency_c1.py [--rounds 4]

One round = direct then through skyfleet, non-streaming and streaming, 6 s each; repeating the
rounds shows how much of a p99 is the shared machine rather than the gateway. Writes
bench/results/latency_c1.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import ROOT, measure, start_stack


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    _, fast, _, sims, sky, url, key = start_stack("skyfleet-c1-")
    rows = []
    try:
        asyncio.run(measure("warm", url, key, sky.pid, model="sim-model", stream=False, concurrency=8,
                            requests=1000, duration_s=3))
        for rnd in range(args.rounds):
            for stream in (False, True):
                d = asyncio.run(measure("direct", f"http://127.0.0.1:{fast}", None, None, model="sim-model",
                                        stream=stream, concurrency=1, requests=5000, duration_s=6))
                s = asyncio.run(measure("skyfleet", url, key, sky.pid, model="sim-model", stream=stream,
                                        concurrency=1, requests=5000, duration_s=6))
                row = (rnd + 1, "stream" if stream else "unary", round(s["ttft_ms"]["p50"] - d["ttft_ms"]["p50"], 2),
                       round(s["ttft_ms"]["p99"] - d["ttft_ms"]["p99"], 2),
                       round(s["e2e_ms"]["p99"] - d["e2e_ms"]["p99"], 2))
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    finally:
        for p in (sky, *sims):
            p.terminate()
    md = ["# Added latency at concurrency 1, repeated rounds", "",
          f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}; gateway on CPU 0, `skyfleet engine sim --fast` and the load "
          "generator on CPU 1; auth and request accounting on. Goal: p50 <= 1 ms, p99 <= 3 ms.", "",
          "| round | mode | added TTFT p50 ms | added TTFT p99 ms | added E2E p99 ms |", "|---|---|---|---|---|",
          *[f"| {r} | {m} | {a} | {b} | {c} |" for r, m, a, b, c in rows]]
    out = ROOT / "bench" / "results" / "latency_c1.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
