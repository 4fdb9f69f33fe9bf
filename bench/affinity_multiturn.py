"""Multi-turn sessions on 2 real llama.cpp replicas: session affinity vs round robin.

    .venv/bin/python bench/affinity_multiturn.py [--sessions 8 --turns 5]

Each session has its own long system prompt and grows turn by turn (the full history is sent
every turn, as a chat-completions client does), with ``X-Session-Id`` set. The same workload
runs through a gateway with ``routing.policy=affinity`` and one with ``round-robin``, one after
the other. Reported: TTFT p50/p90 of turns >= 2 and the prefix-cache hit ratio
(cached_tokens / prompt_tokens) of turns >= 2. Writes bench/results/affinity_multiturn.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
TOPICS = ["volcanoes", "medieval castles", "honey bees", "jazz history", "deep sea fish", "glaciers",
          "the silk road", "steam engines", "coral reefs", "chess openings", "tea ceremonies", "comets"]


def start_gateway(workdir: Path, policy: str) -> tuple[subprocess.Popen[bytes], str, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYFLEET_")}
    env.update({"SKYFLEET_DATA_DIR": str(workdir / ".skyfleet"), "SKYFLEET_ROUTING__POLICY": policy})
    out = workdir / "out.log"
    proc = subprocess.Popen([sys.executable, "-m", "skyfleet", "serve", "--port", str(port)], env=env,
                            stdout=open(out, "wb"), stderr=open(workdir / "err.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=1)
            if r.status_code == 200 and sum(r.json()["ready_replicas"].values()) == 2:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    key = re.search(r"API key\s+\(member\):\s+(\S+)", out.read_text()).group(1)  # type: ignore[union-attr]
    return proc, url, key


async def session(client: openai.AsyncOpenAI, idx: int, turns: int) -> list[dict[str, Any]]:
    topic = TOPICS[idx % len(TOPICS)]
    system = (f"You are an expert on {topic}. Session {idx}. Answer briefly and precisely. "
              + f"Background notes on {topic}: " + f"{topic} are fascinating and well studied. " * 25)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    out = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t + 1} about {topic}: tell me one more fact."})
        start = time.perf_counter()
        ttft = None
        text, usage = [], None
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Session-Id": f"bench-{idx}"})
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        messages.append({"role": "assistant", "content": "".join(text)})
        cached = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
        out.append({"session": idx, "turn": t + 1, "ttft_s": ttft, "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "cached_tokens": cached or 0})
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    later = [r for r in rows if r["turn"] >= 2 and r["ttft_s"] is not None]
    ttfts = sorted(r["ttft_s"] for r in later)
    prompt = sum(r["prompt_tokens"] for r in later)
    cached = sum(r["cached_tokens"] for r in later)
    return {"turns_ge2": len(later), "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p90_ms": round(ttfts[int(0.9 * (len(ttfts) - 1))] * 1000, 1),
            "hit_ratio": round(cached / prompt, 3) if prompt else 0.0,
            "first_turn_ttft_p50_ms": round(statistics.median(
                [r["ttft_s"] for r in rows if r["turn"] == 1 and r["ttft_s"]]) * 1000, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "affinity_multiturn")
    args = ap.parse_args()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sessions": args.sessions,
                               "turns": args.turns, "policies": {}}
    for policy in ("affinity", "round-robin"):
        workdir = Path(tempfile.mkdtemp(prefix=f"skyfleet-mt-{policy}-"))
        proc, url, key = start_gateway(workdir, policy)
        try:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)

            async def run_all(c: openai.AsyncOpenAI = client) -> list[list[dict[str, Any]]]:
                return await asyncio.gather(*(session(c, i, args.turns) for i in range(args.sessions)))

            rows = [r for s in asyncio.run(run_all()) for r in s]
            results["policies"][policy] = {"summary": summarise(rows), "rows": rows}
            print(f"{policy}: {results['policies'][policy]['summary']}", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
    a, rr = results["policies"]["affinity"]["summary"], results["policies"]["round-robin"]["summary"]
    results["ttft_ratio_rr_over_affinity"] = round(rr["ttft_p50_ms"] / a["ttft_p50_ms"], 2)
    md = [
        "# Multi-turn sessions: affinity vs round robin (2 llama.cpp replicas, 2 slots each)", "",
        f"Run {results['started']}: {args.sessions} concurrent sessions x {args.turns} turns, SmolLM2-135M, "
        "each session ~300-token system prompt, full history resent every turn, 16 output tokens.", "",
        "| policy | TTFT p50 turns>=2 (ms) | TTFT p90 turns>=2 (ms) | hit ratio turns>=2 | TTFT p50 turn 1 (ms) |",
        "|---|---|---|---|---|",
        *[f"| {p} | {s['summary']['ttft_p50_ms']} | {s['summary']['ttft_p90_ms']} | {s['summary']['hit_ratio']} | "
          f"{s['summary']['first_turn_ttft_p50_ms']} |" for p, s in results["policies"].items()],
        "", f"TTFT p50 of turns >= 2, round robin / affinity: **{results['ttft_ratio_rr_over_affinity']}x**.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
