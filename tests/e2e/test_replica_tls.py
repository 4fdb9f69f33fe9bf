"""TLS and mTLS from the gateway to replicas: a simulated engine serving HTTPS that requires a client
certificate, reached by a gateway with the dev CA and a client certificate from `skyfleet certs dev`."""

from __future__ import annotations

import json
import re
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.harness import Gateway, free_port, gateway_env, wait_until

_KEY = re.compile(r"(API key|Admin key)\s+\([^)]*\):\s+(sk-sf-\S+)")


def _certs(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "skyfleet", "certs", "dev", "--out", str(out), *args],
                   capture_output=True, text=True, check=True, timeout=60)


def _mtls_sim(certs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`skyfleet engine sim` on HTTPS, refusing clients without a certificate signed by certs/ca.pem."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skyfleet", "engine", "sim", "--port", str(port),
                             "--model", "sim-model", "--tls-cert", str(certs / "server.pem"),
                             "--tls-key", str(certs / "server.key"), "--tls-client-ca", str(certs / "ca.pem")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    tls = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    tls.load_cert_chain(certs / "client-gateway.pem", certs / "client-gateway.key")

    def up() -> bool:
        try:
            return httpx.get(url + "/health", verify=tls, timeout=1).is_success
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, 0.05, "the mTLS sim engine")
    except BaseException:
        proc.kill()
        raise
    return proc, url


def _start_gateway(workdir: Path, static: list[dict[str, str]], model: str) -> Gateway:
    """`skyfleet serve` with only static replicas; returns once ``model`` has a READY replica (the
    gateway as a whole is not ready: some of its models have none, on purpose)."""
    workdir.mkdir(parents=True)
    port = free_port()
    # It waits for every model's replicas (at most local.start_timeout_s) before it listens.
    env = gateway_env(workdir / ".skyfleet", static_replicas=json.dumps(static), local__start_timeout_s="3")
    stderr_path = workdir / "gateway.stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "skyfleet", "serve", "--port", str(port), "--replicas", "0"],
                                cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    gw = Gateway(proc=proc, url=f"http://127.0.0.1:{port}", data_dir=workdir / ".skyfleet", env=env,
                 stderr_path=stderr_path)

    def read_stdout() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if m := _KEY.search(raw.decode(errors="replace")):
                gw.keys[m.group(1)] = m.group(2)

    threading.Thread(target=read_stdout, daemon=True).start()

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.logs()[-3000:]}")
        try:
            body = httpx.get(gw.url + "/readyz", timeout=2).json()
        except httpx.HTTPError:
            return False
        return body["ready_replicas"].get(model, 0) > 0 and "Admin key" in gw.keys

    try:
        wait_until(ready, 60, 0.1, f"a ready replica of {model}")
    except BaseException:
        proc.kill()
        raise
    return gw


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path, list[str]]]:
    work = tmp_path_factory.mktemp("replica-tls")
    certs, other = work / "certs", work / "other"
    _certs(certs, "--client", "gateway")
    _certs(other)  # a CA that signed neither the replica nor the gateway
    sims = [_mtls_sim(certs)]
    try:
        sims.append(_mtls_sim(certs))
    except BaseException:
        sims[0][0].kill()
        raise
    good, wrong_ca = sims[0][1], sims[1][1]
    client = {"tls_client_cert": str(certs / "client-gateway.pem"), "tls_client_key": str(certs / "client-gateway.key")}
    static = [
        {"url": good, "model": "secure", "upstream_model": "sim-model", "engine": "vllm",
         "tls_ca_file": str(certs / "ca.pem"), **client},
        # the same replica under another name, as "localhost": the gateway has no client certificate
        {"url": good.replace("127.0.0.1", "localhost"), "model": "no-client-cert", "upstream_model": "sim-model",
         "engine": "vllm", "tls_ca_file": str(certs / "ca.pem")},
        {"url": wrong_ca, "model": "wrong-ca", "upstream_model": "sim-model", "engine": "vllm",
         "tls_ca_file": str(other / "ca.pem"), **client},
        # no verification at all: works, encrypted but unauthenticated, and the gateway says so loudly
        {"url": wrong_ca.replace("127.0.0.1", "localhost"), "model": "unverified", "upstream_model": "sim-model",
         "engine": "vllm", "tls_verify": False, **client},
    ]
    try:
        gw = _start_gateway(work / "gw", static, "secure")
    except BaseException:
        for proc, _ in sims:
            proc.kill()
        raise
    try:
        yield gw, certs, [good, wrong_ca]
    finally:
        gw.stop()
        for proc, _ in sims:
            proc.terminate()
            proc.wait(10)


def test_chat_completion_through_an_mtls_replica(setup: tuple[Gateway, Path, list[str]]) -> None:
    gw, certs, (good, _) = setup
    client = gw.client()
    resp = client.chat.completions.create(model="secure", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert resp.model == "secure" and resp.choices[0].message.content
    chunks = list(client.chat.completions.create(model="secure", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # Metrics scrapes go through the same TLS context (the vLLM adapter reads the sim's gauges).
    wait_until(lambda: next(r for r in gw.replicas() if r["model"] == "secure")["engine_load"]["kv_cache_usage"]
               is not None, 10, 0.1, "a metrics scrape over mTLS")
    # The replica itself refuses a client without a certificate: only the gateway gets in...
    with pytest.raises(httpx.HTTPError):
        httpx.get(good + "/health", verify=ssl.create_default_context(cafile=str(certs / "ca.pem")), timeout=5)
    # ...or whoever gets a certificate from the same CA later (`skyfleet certs client NAME`).
    done = subprocess.run([sys.executable, "-m", "skyfleet", "certs", "client", "ops", "--out", str(certs)],
                          capture_output=True, text=True, check=True, timeout=60)
    assert "client-ops.pem" in done.stdout and stat.S_IMODE((certs / "client-ops.key").stat().st_mode) == 0o600
    tls = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    tls.load_cert_chain(certs / "client-ops.pem", certs / "client-ops.key")
    assert httpx.get(good + "/health", verify=tls, timeout=5).status_code == 200


def test_replicas_that_fail_tls_never_become_ready_and_requests_get_503(
        setup: tuple[Gateway, Path, list[str]]) -> None:
    gw, _, _ = setup
    # Each bad replica has failed at least one health check (logged once, with its reason)...
    wait_until(lambda: gw.logs().count("https replica unreachable") >= 2, 15, 0.1, "failed TLS health checks")
    logs = gw.logs()
    assert "CERTIFICATE_VERIFY_FAILED" in logs  # the wrong CA
    states = {r["model"]: r["state"] for r in gw.replicas()}
    assert states == {"secure": "ready", "no-client-cert": "starting", "wrong-ca": "starting",
                      "unverified": "ready"}
    assert "TLS VERIFICATION IS OFF" in logs
    for model in ("no-client-cert", "wrong-ca"):
        with pytest.raises(openai.APIStatusError) as info:
            gw.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "no_replica_available"  # type: ignore[index]


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    def config_error(static: list[dict[str, object]]) -> str:
        env = {"PATH": "/usr/bin:/bin", "SKYFLEET_STATIC_REPLICAS": json.dumps(static)}
        r = subprocess.run([sys.executable, "-m", "skyfleet", "tenants", "list"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        return r.stderr

    base = {"model": "m", "engine": "vllm"}
    assert "need an https:// url" in config_error([{**base, "url": "http://h:1", "tls_ca_file": "/etc/hostname"}])
    assert "go together" in config_error([{**base, "url": "https://h:1", "tls_client_cert": "/etc/hostname"}])
    assert "file not found" in config_error([{**base, "url": "https://h:1", "tls_ca_file": str(tmp_path / "x")}])
