"""Load generator for OpenAI-compatible endpoints: open loop (Poisson) or closed loop (fixed concurrency).

Records, per request: time to first token (first SSE data event carrying content, or the whole
reply for non-streaming), inter-token latencies, end-to-end latency, status and errors. Results
are a JSON-able summary plus a markdown table row.

    python bench/loadgen.py --url http://127.0.0.1:8000 --key sk-sf-... --model smollm2-135m-instruct \
        --concurrency 64 --requests 2000 --stream --max-tokens 20 --cpu 1 --out results.json

Pinning (``--cpu``) keeps the generator off the core of the process under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(slots=True)
class Sample:
    start: float
    end: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    status: int = 0
    error: str | None = None
    chunks: int = 0


@dataclass
class LoadSpec:
    url: str
    key: str | None
    model: str
    stream: bool = False
    max_tokens: int = 20
    prompt: str = "Say something about the sea."
    route: str = "chat"  # chat | completions
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, i: int) -> bytes:
        base: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "stream": self.stream}
        if self.route == "chat":
            base["messages"] = [{"role": "user", "content": f"{self.prompt} #{i}"}]
        else:
            base["prompt"] = f"{self.prompt} #{i}"
        if self.stream:
            base["stream_options"] = {"include_usage": True}
        base.update(self.extra)
        return orjson.dumps(base)

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + ("/v1/chat/completions" if self.route == "chat" else "/v1/completions")

    @property
    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h


async def _one(session: aiohttp.ClientSession, spec: LoadSpec, i: int) -> Sample:
    s = Sample(start=time.perf_counter())
    try:
        async with session.post(spec.endpoint, data=spec.body(i), headers=spec.headers) as r:
            s.status = r.status
            if not spec.stream or r.status != 200:
                await r.read()
                s.ttft = time.perf_counter() - s.start
                if r.status != 200:
                    s.error = f"http {r.status}"
            else:
                last = None
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    while (cut := buf.find(b"\n\n")) != -1:
                        event, buf = buf[:cut], buf[cut + 2:]
                        if not event.startswith(b"data: ") or event == b"data: [DONE]":
                            continue
                        if b'"error"' in event[:20]:
                            s.error = "stream error event"
                        now = time.perf_counter()
                        if s.ttft is None:
                            s.ttft = now - s.start
                        elif last is not None:
                            s.itl.append(now - last)
                        last = now
                        s.chunks += 1
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        s.error = type(exc).__name__
    s.end = time.perf_counter()
    return s


def _session(limit: int, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


async def closed_loop(spec: LoadSpec, *, concurrency: int, requests: int, duration_s: float | None = None,
                      timeout_s: float = 120, stagger_s: float = 0.0, seed: int = 0) -> list[Sample]:
    """``concurrency`` workers, each sending its next request as soon as the last one ends.

    Stops after ``requests`` requests, or once ``duration_s`` has passed (whichever is first).
    ``stagger_s`` spreads the workers' first requests uniformly over that many seconds: with
    requests of equal length, workers that start together stay phase-locked and every "round"
    arrives as one burst of ``concurrency`` requests.
    """
    rng = random.Random(seed)
    samples: list[Sample] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + duration_s if duration_s else float("inf")
    async with _session(concurrency, timeout_s) as session:

        async def worker(delay: float) -> None:
            if delay:
                await asyncio.sleep(delay)
            for i in counter:
                samples.append(await _one(session, spec, i))
                if time.perf_counter() > deadline:
                    return

        await asyncio.gather(*(worker(rng.uniform(0, stagger_s) if stagger_s else 0.0) for _ in range(concurrency)))
    return samples


async def open_loop(spec: LoadSpec, *, rate: float, duration_s: float, seed: int = 0,
                    timeout_s: float = 120, max_inflight: int = 4096) -> list[Sample]:
    """Poisson arrivals at ``rate`` per second for ``duration_s``, independent of completions."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Sample]] = []
    async with _session(max_inflight, timeout_s) as session:
        t0 = time.perf_counter()
        at = 0.0
        i = 0
        while True:
            at += rng.expovariate(rate)
            if at > duration_s:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, spec, i)))
            i += 1
        return list(await asyncio.gather(*tasks))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None and s.status == 200]
    failed = [s for s in samples if not (s.error is None and s.status == 200)]
    wall = (max(s.end for s in samples) - min(s.start for s in samples)) if samples else 0.0
    e2e = [s.end - s.start for s in ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    itl = [x for s in ok for x in s.itl]
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_kinds": sorted({s.error or f"http {s.status}" for s in failed})[:5],
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 1) if wall else 0.0,
        "ttft_ms": {"p50": ms(_pct(ttft, 0.5)), "p90": ms(_pct(ttft, 0.9)), "p99": ms(_pct(ttft, 0.99)),
                    "mean": ms(statistics.fmean(ttft)) if ttft else None},
        "itl_ms": {"p50": ms(_pct(itl, 0.5)), "p99": ms(_pct(itl, 0.99))},
        "e2e_ms": {"p50": ms(_pct(e2e, 0.5)), "p90": ms(_pct(e2e, 0.9)), "p99": ms(_pct(e2e, 0.99)),
                   "mean": ms(statistics.fmean(e2e)) if e2e else None},
        "chunks_mean": round(statistics.fmean([s.chunks for s in ok]), 1) if ok else 0,
    }


def markdown_row(name: str, summary: dict[str, Any]) -> str:
    t, e = summary["ttft_ms"], summary["e2e_ms"]
    return (f"| {name} | {summary['ok']}/{summary['requests']} | {summary['throughput_rps']} | "
            f"{t['p50']} | {t['p99']} | {e['p50']} | {e['p99']} | {summary['itl_ms']['p50']} |")


MARKDOWN_HEADER = ("| run | ok | req/s | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms | ITL p50 ms |\n"
                   "|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", default=os.environ.get("SKYFLEET_KEY"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--route", choices=["chat", "completions"], default="chat")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=20)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="closed loop with this many workers")
    mode.add_argument("--rate", type=float, help="open loop, Poisson arrivals per second")
    ap.add_argument("--requests", type=int, default=1000, help="closed loop: total requests")
    ap.add_argument("--duration", type=float, default=30.0, help="open loop: seconds")
    ap.add_argument("--cpu", type=str, help="pin this process to these CPUs, e.g. '1' or '1,2'")
    ap.add_argument("--out", help="write the summary as JSON here")
    args = ap.parse_args(argv)
    if args.cpu:
        os.sched_setaffinity(0, {int(c) for c in args.cpu.split(",")})
    spec = LoadSpec(url=args.url, key=args.key, model=args.model, stream=args.stream, max_tokens=args.max_tokens,
                    route=args.route)
    if args.concurrency:
        samples = asyncio.run(closed_loop(spec, concurrency=args.concurrency, requests=args.requests))
        name = f"closed c={args.concurrency}{' stream' if args.stream else ''}"
    else:
        samples = asyncio.run(open_loop(spec, rate=args.rate, duration_s=args.duration))
        name = f"open {args.rate}/s{' stream' if args.stream else ''}"
    summary = summarise(samples)
    print(MARKDOWN_HEADER)
    print(markdown_row(name, summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"spec": asdict(spec) | {"key": None}, "summary": summary}, f, indent=2)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
