"""Schemathesis against the running gateway's own OpenAPI document: no input gives a server error.

The gateway runs for real (SQLite store, encryption, auth); its one replica is the simulated
engine in fast mode, so generated requests that pass validation cost microseconds instead of
llama.cpp generations (the engine is not what is under test here; the gateway is).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import Gateway, free_port, start_gateway, wait_until

pytestmark = pytest.mark.e2e
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def sim_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    engine = subprocess.Popen([sys.executable, "-m", "skyfleet", "engine", "sim", "--port", str(port),
                               "--model", "sim-model", "--fast"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, 0.05, "sim engine")
        static = [{"url": url, "model": "sim-model", "engine": "sim", "context_window": 4096}]
        gw = start_gateway(tmp_path_factory.mktemp("st"), replicas=0, static_replicas=json.dumps(static))
        wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys")
        yield gw
        gw.stop()
    finally:
        engine.terminate()
        engine.wait(10)


def _run(gw: Gateway, key: str, tmp_path: Path, *filters: str,
         parameters: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "schemathesis.toml"
    config.write_text("[parameters]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in (parameters or {}).items()))
    cmd = [str(SCHEMATHESIS), "--config-file", str(config), "run", gw.url + "/openapi.json", "--checks", "not_a_server_error",
           "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--workers", "1",
           "--request-timeout", "20", "--suppress-health-check", "all", "-H", f"Authorization: Bearer {key}",
           "--report", "junit", "--report-dir", str(tmp_path), *filters]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def _stuck_on_404(out: str) -> int:
    m = re.search(r"Missing test data: (\d+) operations", out)
    return int(m.group(1)) if m else 0


def _assert_clean(gw: Gateway, proc: subprocess.CompletedProcess[str]) -> None:
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, f"schemathesis found failures:\n{tail}\n{proc.stderr[-2000:]}"
    assert "passed" in proc.stdout, tail
    assert '"error_type"' not in gw.logs() or "unexpected error" not in gw.logs(), gw.logs()[-3000:]


def test_tenant_routes_never_return_a_server_error(sim_gateway: Gateway, tmp_path: Path) -> None:
    proc = _run(sim_gateway, sim_gateway.member_key, tmp_path, "--exclude-tag", "admin")
    _assert_clean(sim_gateway, proc)
    stuck = _stuck_on_404(proc.stdout)
    # Again with ids that exist, so generated requests get past the lookups into the handlers.
    client = sim_gateway.client()
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "hello"}])
    item = client.conversations.items.list(conv.id).data[0]
    resp = client.responses.create(model="sim-model", input="hi", max_output_tokens=4)
    proc = _run(sim_gateway, sim_gateway.member_key, tmp_path, "--exclude-tag", "admin",
                parameters={"cid": conv.id, "item_id": item.id, "response_id": resp.id, "model": "sim-model"})
    _assert_clean(sim_gateway, proc)
    # The real ids got the generated requests past the lookups (fewer operations stuck on 404s).
    assert _stuck_on_404(proc.stdout) < stuck, proc.stdout[-3000:]


def test_admin_routes_never_return_a_server_error(sim_gateway: Gateway, tmp_path: Path) -> None:
    proc = _run(sim_gateway, sim_gateway.admin_key, tmp_path, "--include-tag", "admin")
    _assert_clean(sim_gateway, proc)
    # The platform admin key runs the tenant routes too (it has no tenant of its own).
    proc = _run(sim_gateway, sim_gateway.admin_key, tmp_path, "--exclude-tag", "admin")
    _assert_clean(sim_gateway, proc)
