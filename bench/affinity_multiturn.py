"""Multi-turn sessions on 2 real llama.cpp replicas: session affinity vs round robin.

    .venv/bin/python bench/affinity_multiturn.py [--sessions 8 --turns 5]

Each session grows turn by turn (every user turn adds new notes; the full history is sent every
turn, as a chat-completions client does), with ``X-Session-Id`` set. The same workload
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


def start_gateway(workdir: Path, policy: str, slots: bool, threads: int) -> tuple[subprocess.Popen[bytes], str, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYFLEET_")}
    env.update({"SKYFLEET_DATA_DIR": str(workdir / ".skyfleet"), "SKYFLEET_ROUTING__POLICY": policy,
                "SKYFLEET_LOCAL__KV_SLOT_MANAGER": str(slots).lower(), "SKYFLEET_LOCAL__THREADS": str(threads)})
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


async def session(client: openai.AsyncOpenAI, idx: int, turns: int, turn_words: int,
                  max_tokens: int) -> list[dict[str, Any]]:
    topic = TOPICS[idx % len(TOPICS)]
    system = f"You are an expert on {topic}. Session {idx}. Answer briefly and precisely."
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    out = []
    for t in range(turns):
        notes = " ".join(f"{topic}-note-{t}-{w}" for w in range(turn_words))
        messages.append({"role": "user", "content": f"Turn {t + 1}. My notes: {notes}. Tell me one more fact."})
        start = time.perf_counter()
        ttft = None
        text, usage = [], None
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
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
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions (default: as many as slots)")
    ap.add_argument("--turn-words", type=int, default=30, help="new words of notes per user turn (~4 tokens each)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per replica (2 replicas x 2 threads oversubscribe a 2-core machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "affinity_multiturn")
    args = ap.parse_args()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sessions": args.sessions,
                               "turns": args.turns, "policies": {}}
    configs = [("affinity", True), ("round-robin", True), ("affinity", False), ("round-robin", False)]
    for policy, slots in configs:
        name = f"{policy}, {'slot manager' if slots else 'llama.cpp picks slots'}"
        workdir = Path(tempfile.mkdtemp(prefix=f"skyfleet-mt-{policy}-"))
        proc, url, key = start_gateway(workdir, policy, slots, args.threads)
        try:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)

            async def run_all(c: openai.AsyncOpenAI = client) -> list[list[dict[str, Any]]]:
                return await asyncio.gather(*(session(c, i, args.turns, args.turn_words, args.max_tokens)
                                              for i in range(args.sessions)))

            rows = [r for s in asyncio.run(run_all()) for r in s]
            results["policies"][name] = {"summary": summarise(rows), "rows": rows}
            print(f"{name}: {results['policies'][name]['summary']}", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
    p = results["policies"]
    for slots in ("slot manager", "llama.cpp picks slots"):
        a, rr = p[f"affinity, {slots}"]["summary"], p[f"round-robin, {slots}"]["summary"]
        results[f"ttft_ratio_rr_over_affinity ({slots})"] = round(rr["ttft_p50_ms"] / a["ttft_p50_ms"], 2)
    md = [
        "# Multi-turn sessions: affinity vs round robin (2 llama.cpp replicas, 2 slots each)", "",
        f"Run {results['started']}: {args.sessions} concurrent sessions x {args.turns} turns, SmolLM2-135M, "
        f"{args.threads} thread(s) per replica; a growing conversation: each user turn adds ~{args.turn_words * 4} "
        f"tokens of notes, {args.max_tokens} output tokens, the full history is resent every turn. 'slot manager': skyfleet pins each session to a slot and saves/restores "
        "evicted slots; 'llama.cpp picks slots': routing alone decides where the cache is.", "",
        "| policy | TTFT p50 turns>=2 (ms) | TTFT p90 turns>=2 (ms) | hit ratio turns>=2 | TTFT p50 turn 1 (ms) |",
        "|---|---|---|---|---|",
        *[f"| {p} | {s['summary']['ttft_p50_ms']} | {s['summary']['ttft_p90_ms']} | {s['summary']['hit_ratio']} | "
          f"{s['summary']['first_turn_ttft_p50_ms']} |" for p, s in results["policies"].items()],
        "", *[f"TTFT p50 of turns >= 2, round robin / affinity ({k.split('(')[1][:-1]}): **{v}x**."
              for k, v in results.items() if k.startswith("ttft_ratio")],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
