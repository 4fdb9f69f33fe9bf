"""Start a real gateway (`skyfleet serve`, real llama.cpp replicas) in a subprocess and talk to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

MODEL = "smollm2-135m-instruct"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]
_KEY = re.compile(r"(API key|Admin key)\s+\([^)]*\):\s+(sk-sf-\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> float:
    """Poll ``predicate`` until true; return the seconds it took. Polling, not sleeping-to-synchronise."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    stderr_path: Path | None = None
    group: bool = False  # started in its own process group (via make)
    verify: Any = True  # TLS: the CA file that signed the gateway's certificate

    @property
    def member_key(self) -> str:
        return self.keys["API key"]

    @property
    def admin_key(self) -> str:
        return self.keys["Admin key"]

    def client(self, key: str | None = None, **kw: Any) -> openai.OpenAI:
        if self.verify is not True:
            kw.setdefault("http_client", httpx.Client(verify=self.verify))
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.member_key, max_retries=0, **kw)

    def async_client(self, key: str | None = None, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key or self.member_key, max_retries=0, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, verify=self.verify)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        with self.http() as h:
            return h.request(method, path, headers={"Authorization": f"Bearer {self.admin_key}"}, **kw)

    def replicas(self) -> list[dict[str, Any]]:
        r = self.admin("GET", "/admin/v1/replicas")
        r.raise_for_status()
        return list(r.json()["data"])

    def ready(self, replicas: int = 1) -> bool:
        """Ready, with at least ``replicas`` replicas in routing (readiness alone needs one per model)."""
        try:
            with self.http() as h:
                r = h.get("/readyz", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and sum(r.json()["ready_replicas"].values()) >= replicas

    def metric(self, name: str, key: str | None = None, **labels: str) -> float:
        """Sum of a metric's samples whose labels include ``labels`` (read with a platform-admin ``key``)."""
        with self.http() as h:
            text = h.get("/metrics", headers={"Authorization": f"Bearer {key or self.admin_key}"}).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "skyfleet", *args], env=self.env, cwd=self.data_dir.parent,
            capture_output=True, text=True, check=check, timeout=60,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            if self.group:
                os.killpg(self.proc.pid, sig)  # make and the gateway under it
            else:
                self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""


def gateway_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYFLEET_") or k.startswith("SKYFLEET_TEST_")}
    env["SKYFLEET_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in settings.items():
        env[f"SKYFLEET_{key.upper()}"] = value
    return env


def start_gateway(workdir: Path, *, replicas: int = 2, ready_timeout_s: float = 90, via_make: bool = False,
                  tls_ca: Path | None = None, min_ready: int | None = None, **settings: str) -> Gateway:
    """Start ``skyfleet serve`` (or the README's ``make serve``) and wait until its replicas are in routing."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / ".skyfleet"
    port = free_port()
    env = gateway_env(data_dir, **settings)
    stderr_path = workdir / "gateway.stderr.log"
    with open(stderr_path, "wb") as err:
        if via_make:
            cmd, cwd = ["make", "-s", "serve", f"PORT={port}"], ROOT
        else:
            cmd, cwd = [sys.executable, "-m", "skyfleet", "serve", "--port", str(port), "--replicas", str(replicas)], workdir
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=via_make)
    scheme = "https" if tls_ca else "http"
    gw = Gateway(proc=proc, url=f"{scheme}://127.0.0.1:{port}", data_dir=data_dir, env=env, stderr_path=stderr_path,
                 group=via_make, verify=ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True)
    out_lines: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            out_lines.append(line)
            if m := _KEY.search(line):
                gw.keys[m.group(1)] = m.group(2)

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        want = max(1, replicas) if min_ready is None else min_ready
        wait_until(lambda: gw.ready(want) or proc.poll() is not None, ready_timeout_s, 0.1,
                   "gateway readiness")
    except TimeoutError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.logs()[-3000:]}")
    return gw


def redis_keys(prefix: str) -> list[bytes]:
    """The keys under ``prefix`` in the test Redis."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        return list(client.scan_iter(match=f"{prefix}*"))


def drop_redis_keys(prefix: str) -> None:
    """Delete what a test wrote under ``prefix`` in the test Redis."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
