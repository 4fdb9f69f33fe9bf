"""Gateway overhead side by side: one simulated upstream reached directly, through skyfleet, through LiteLLM.

    make bench                       # or: .venv/bin/python bench/gateway_overhead.py [--quick]

Layout on a 2-core machine: the gateway under test is pinned to CPU 0; the simulated engine and
this load generator share CPU 1. Every configuration runs the three targets back to back, so the
figures are ratios taken side by side in one run. Written: bench/results/gateway_overhead.{json,md}.

* skyfleet: `skyfleet serve` with auth (API key), request accounting (metrics observer) and JSON
  logs on; no local replicas, the simulated engines as static replicas.
* LiteLLM: its proxy (version pinned in bench/requirements-litellm.txt, installed into
  bench/.venv-litellm by this script) with a master key, one worker, no database: LiteLLM's
  database mode needs Prisma engines downloaded at run time, which fails offline (the attempt is
  recorded in the results).
* CPU per 1,000 requests: user+system seconds of the target's whole process tree, from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadSpec, closed_loop, summarise
from procstat import cpu_seconds, memory, tree

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
CPU_TARGET, CPU_LOAD = "0", "1"
PY = sys.executable
LITELLM_KEY = "sk-bench-master"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def start_sim(port: int, *, paced: str | None, logdir: Path) -> subprocess.Popen[bytes]:
    cmd = ["taskset", "-c", CPU_LOAD, PY, "-m", "skyfleet", "engine", "sim", "--port", str(port),
           "--model", "sim-model", "--ignore-eos"]
    cmd += ["--paced", paced] if paced else ["--fast"]
    proc = subprocess.Popen(cmd, stdout=open(logdir / f"sim-{port}.log", "wb"), stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/health", 30)
    return proc


#: The "skyfleet+guards" target: rate limits and a hard budget enforced through Redis on every
#: request (limits high enough that nothing is refused), to measure what admission costs.
GUARDS_ENV = {"SKYFLEET_REDIS_URL": "redis://127.0.0.1:6379/0",
              "SKYFLEET_LIMITS__DEFAULT_TENANT_RPM": "1000000000", "SKYFLEET_LIMITS__DEFAULT_TENANT_TPM": "1000000000000"}


def add_budget(url: str, workdir: Path, name: str) -> None:
    """A monthly hard budget for the default tenant, far above what the run spends."""
    admin = re.search(r"Admin key\s+\([^)]*\):\s+(\S+)", (workdir / f"{name}.out").read_text())
    assert admin is not None, "no admin key printed"
    r = httpx.post(url + "/admin/v1/budgets", headers={"Authorization": f"Bearer {admin.group(1)}"},
                   json={"tenant": "default", "period": "monthly", "hard_limit_usd": "100000"})
    r.raise_for_status()


def start_skyfleet(workdir: Path, fast_port: int, paced_port: int, *, name: str = "skyfleet",
                   extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYFLEET_")}
    env.update({
        "SKYFLEET_DATA_DIR": str(workdir / f".{name}"),
        "SKYFLEET_LOCAL__REPLICAS": "0",
        "SKYFLEET_STATIC_REPLICAS": json.dumps([
            {"url": f"http://127.0.0.1:{fast_port}", "model": "sim-model", "engine": "sim"},
            {"url": f"http://127.0.0.1:{paced_port}", "model": "sim-paced", "upstream_model": "sim-model",
             "engine": "sim"},
        ]),
    })
    env.update(extra_env or {})
    out = workdir / f"{name}.out"
    proc = subprocess.Popen(["taskset", "-c", CPU_TARGET, PY, "-m", "skyfleet", "serve", "--port", str(port)],
                            env=env, stdout=open(out, "wb"), stderr=open(workdir / f"{name}.err", "wb"))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", 60)
    key = re.search(r"API key\s+\(member\):\s+(\S+)", out.read_text()).group(1)  # type: ignore[union-attr]
    return proc, url, key


def start_stack(prefix: str) -> tuple[Path, int, int, list[subprocess.Popen[bytes]], subprocess.Popen[bytes], str, str]:
    """Pin this process to the load CPU; start a fast and a paced simulated engine and skyfleet.

    Returns (workdir, fast_port, paced_port, sims, gateway, gateway_url, api_key)."""
    os.sched_setaffinity(0, {int(CPU_LOAD)})
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    fast, paced = free_port(), free_port()
    sims = [start_sim(fast, paced=None, logdir=workdir), start_sim(paced, paced="0.05,0.01", logdir=workdir)]
    gw, url, key = start_skyfleet(workdir, fast, paced)
    return workdir, fast, paced, sims, gw, url, key


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        log(f"installing LiteLLM into {LITELLM_VENV} (pinned in bench/requirements-litellm.txt; takes minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "-r",
                        str(ROOT / "bench" / "requirements-litellm.txt")], check=True)
    return exe


def litellm_env() -> dict[str, str]:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


def litellm_config(workdir: Path, fast_port: int, paced_port: int, database_url: str | None = None) -> Path:
    models = "".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: openai/sim-model\n"
        f"      api_base: http://127.0.0.1:{port}/v1\n      api_key: none\n"
        for name, port in (("sim-model", fast_port), ("sim-paced", paced_port))
    )
    general = f"general_settings:\n  master_key: {LITELLM_KEY}\n"
    if database_url:
        general += f"  database_url: {database_url}\n"
    path = workdir / ("litellm-db.yaml" if database_url else "litellm.yaml")
    path.write_text(f"model_list:\n{models}{general}")
    return path


def start_litellm(exe: Path, config: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", CPU_TARGET, str(exe), "--config", str(config), "--port", str(port), "--host",
         "127.0.0.1", "--num_workers", "1"],
        env=litellm_env(), stdout=open(workdir / "litellm.log", "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", 120)
    return proc, url, LITELLM_KEY


def try_litellm_database_mode(exe: Path, workdir: Path, fast_port: int, paced_port: int) -> str:
    """LiteLLM's recommended production mode (PostgreSQL + spend tracking). Record what happens."""
    config = litellm_config(workdir, fast_port, paced_port,
                            database_url="postgresql://postgres@127.0.0.1:5432/postgres")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "--config", str(config), "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1"],
        env=litellm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", 60)
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                        headers={"Authorization": f"Bearer {LITELLM_KEY}"},
                        json={"model": "sim-model", "messages": [{"role": "user", "content": "x"}]}).status_code
        return f"started; a request returned HTTP {ok}"
    except TimeoutError:
        proc.kill()
        text = proc.communicate(timeout=10)[0].decode(errors="replace")
        lines = [ln for ln in text.splitlines() if re.search(r"prisma|error|Error|fail", ln)]
        return "failed to start: " + " | ".join(lines[-3:])[:600]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def signal_tree(pid: int, sig: int) -> None:
    for p in tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class Paused:
    """SIGSTOP the other gateways while one is measured: idle processes on the same core still run
    timers and background loops, which would show up in the measured gateway's latency."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids

    def __enter__(self) -> None:
        for pid in self._pids:
            signal_tree(pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        for pid in self._pids:
            signal_tree(pid, signal.SIGCONT)


async def measure(name: str, url: str, key: str | None, pid: int | None, *, model: str, stream: bool,
                  concurrency: int, requests: int, duration_s: float, stagger_s: float = 0.0) -> dict[str, Any]:
    spec = LoadSpec(url=url, key=key, model=model, stream=stream, max_tokens=20)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    samples = await closed_loop(spec, concurrency=concurrency, requests=requests, duration_s=duration_s,
                                stagger_s=stagger_s)
    cpu1 = cpu_seconds(pid) if pid else 0.0
    s = summarise(samples)
    s["target"] = name
    if pid:
        s["cpu_s"] = round(cpu1 - cpu0, 3)
        s["cpu_s_per_1000"] = round((cpu1 - cpu0) / max(1, s["ok"]) * 1000, 3)
        mem = memory(pid)
        s["rss_mib"], s["peak_rss_mib"] = round(mem.rss_mib, 1), round(mem.peak_mib, 1)
    return s


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 1) if a and b else None


def render_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Gateway overhead: direct vs skyfleet vs LiteLLM", "",
        f"Run {results['started']}, {results['machine']}. Gateway pinned to CPU {CPU_TARGET}; simulated engine "
        f"and load generator on CPU {CPU_LOAD}. Upstream: `skyfleet engine sim --fast --ignore-eos` "
        "(20 tokens per request; streams are 20 content chunks). LiteLLM "
        f"{results['litellm_version']}, master key, no database ({results['litellm_database_mode']}).", "",
        "| mode | conc. | target | ok | req/s | CPU s / 1k req | E2E p50 ms | E2E p99 ms | TTFT p50 ms | "
        "added p50 ms | added p99 ms | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        for t in row["targets"]:
            add = t.get("added_ms", {})
            lines.append(
                f"| {'stream' if row['stream'] else 'unary'} | {row['concurrency']} | {t['target']} | "
                f"{t['ok']}/{t['requests']} | {t['throughput_rps']} | {t.get('cpu_s_per_1000', '-')} | "
                f"{t['e2e_ms']['p50']} | {t['e2e_ms']['p99']} | {t['ttft_ms']['p50']} | "
                f"{add.get('e2e_p50', '-')} | {add.get('e2e_p99', '-')} | {t.get('peak_rss_mib', '-')} |")
    lines += ["", "## Ratios (LiteLLM / skyfleet, same run)", "",
              "| mode | conc. | CPU per request | throughput (skyfleet / LiteLLM) |", "|---|---|---|---|"]
    for row in results["runs"]:
        r = row.get("ratios", {})
        lines.append(f"| {'stream' if row['stream'] else 'unary'} | {row['concurrency']} | "
                     f"{r.get('cpu_per_request', '-')}x | {r.get('throughput', '-')}x |")
    if results.get("paced"):
        lines += ["", "## Paced upstream (TTFT 50 ms, 10 ms per token, 20 tokens), 64 concurrent streams", "",
                  "Phase-locked: all 64 workers start together, so with equal-length streams every round "
                  "arrives as one burst of 64 requests. Staggered: the workers' first requests are spread "
                  "over 250 ms (one stream's length), as independent clients would be.", "",
                  "| workers | target | req/s | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | added TTFT p99 ms |",
                  "|---|---|---|---|---|---|---|"]
        for t in results["paced"]:
            add = t.get("added_ms", {})
            lines.append(f"| {'staggered' if t.get('stagger_s') else 'phase-locked'} | {t['target']} | "
                         f"{t['throughput_rps']} | {t['ttft_ms']['p50']} | {t['ttft_ms']['p99']} | "
                         f"{add.get('ttft_p50', '-')} | {add.get('ttft_p99', '-')} |")
    return "\n".join(lines) + "\n"


def _added(t: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    def d(a: float | None, b: float | None) -> float | None:
        return round(a - b, 3) if a is not None and b is not None else None
    return {"e2e_p50": d(t["e2e_ms"]["p50"], direct["e2e_ms"]["p50"]),
            "e2e_p99": d(t["e2e_ms"]["p99"], direct["e2e_ms"]["p99"]),
            "ttft_p50": d(t["ttft_ms"]["p50"], direct["ttft_ms"]["p50"]),
            "ttft_p99": d(t["ttft_ms"]["p99"], direct["ttft_ms"]["p99"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test of the harness)")
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--guards", action="store_true",
                    help="also measure skyfleet with Redis rate limits and a hard budget on every request")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway_overhead")
    args = ap.parse_args()
    dur = 3.0 if args.quick else 8.0
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [], "paced": [],
                               "machine": f"{os.cpu_count()} CPUs", "litellm_version": None,
                               "litellm_database_mode": "not tried"}
    try:
        workdir, fast_port, paced_port, sims, sky, sky_url, sky_key = start_stack("skyfleet-bench-")
        procs += [*sims, sky]
        targets: list[tuple[str, str, str | None, int | None]] = [
            ("direct", f"http://127.0.0.1:{fast_port}", None, None), ("skyfleet", sky_url, sky_key, sky.pid)]
        if args.guards:
            guarded, g_url, g_key = start_skyfleet(workdir, fast_port, paced_port, name="guarded",
                                                  extra_env=GUARDS_ENV)
            procs.append(guarded)
            add_budget(g_url, workdir, "guarded")
            targets.append(("skyfleet+guards", g_url, g_key, guarded.pid))
        if not args.skip_litellm:
            exe = ensure_litellm()
            results["litellm_version"] = subprocess.run(
                [str(LITELLM_VENV / "bin" / "python"), "-c", "import importlib.metadata as m;"
                 "print(m.version('litellm'))"], capture_output=True, text=True).stdout.strip()
            log("trying LiteLLM's database mode")
            results["litellm_database_mode"] = try_litellm_database_mode(exe, workdir, fast_port, paced_port)
            log(f"LiteLLM database mode: {results['litellm_database_mode'][:120]}")
            lite, lite_url, lite_key = start_litellm(exe, litellm_config(workdir, fast_port, paced_port), workdir)
            procs.append(lite)
            targets.append(("litellm", lite_url, lite_key, lite.pid))
        gateways = [pid for _, _, _, pid in targets if pid]

        def others(pid: int | None) -> Paused:
            return Paused([p for p in gateways if p != pid])

        for name, url, key, pid in targets:  # warm-up
            with others(pid):
                asyncio.run(measure(name, url, key, pid, model="sim-model", stream=False, concurrency=8,
                                    requests=200, duration_s=5))
        for stream in (False, True):
            for conc in (1, 64, 256):
                row: dict[str, Any] = {"stream": stream, "concurrency": conc, "targets": []}
                for name, url, key, pid in targets:
                    log(f"{'stream' if stream else 'unary'} c={conc} {name}")
                    with others(pid):
                        t = asyncio.run(measure(name, url, key, pid, model="sim-model", stream=stream,
                                                concurrency=conc, requests=50_000 if conc > 1 else 5000,
                                                duration_s=dur))
                    row["targets"].append(t)
                direct = row["targets"][0]
                for t in row["targets"][1:]:
                    t["added_ms"] = _added(t, direct)
                by = {t["target"]: t for t in row["targets"]}
                if "litellm" in by:
                    row["ratios"] = {
                        "cpu_per_request": _ratio(by["litellm"].get("cpu_s_per_1000"),
                                                  by["skyfleet"].get("cpu_s_per_1000")),
                        "throughput": _ratio(by["skyfleet"]["throughput_rps"], by["litellm"]["throughput_rps"]),
                    }
                results["runs"].append(row)
        paced_targets = [("direct", f"http://127.0.0.1:{paced_port}", None, None),
                         *[(n, u, k, p) for n, u, k, p in targets if n != "direct"]]
        for stagger in (0.0, 0.25):
            first: dict[str, Any] | None = None
            for name, url, key, pid in paced_targets:
                log(f"paced c=64 stream {name} stagger={stagger}")
                model = "sim-model" if name == "direct" else "sim-paced"
                with others(pid):
                    t = asyncio.run(measure(name, url, key, pid, model=model, stream=True, concurrency=64,
                                            requests=50_000, duration_s=dur, stagger_s=stagger))
                t["stagger_s"] = stagger
                if first is None:
                    first = t
                else:
                    t["added_ms"] = _added(t, first)
                results["paced"].append(t)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = render_markdown(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
