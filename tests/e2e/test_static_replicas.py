"""Static (external) replicas: an engine skyfleet does not run, here the simulated engine with vLLM metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import Gateway, free_port, start_gateway, wait_until


@pytest.fixture
def sim_engine() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skyfleet", "engine", "sim", "--port", str(port),
                             "--model", "sim-model"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, 0.05, "sim engine")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def gw_static(tmp_path: Path, sim_engine: str) -> Iterator[Gateway]:
    static = [{"url": sim_engine, "model": "gpu-model", "upstream_model": "sim-model", "engine": "sim",
               "context_window": 4096}]
    gw = start_gateway(tmp_path, replicas=0, static_replicas=json.dumps(static))
    yield gw
    gw.stop()


def test_static_replica_serves_under_the_gateway_model_name(gw_static: Gateway) -> None:
    client = gw_static.client()
    assert [m.id for m in client.models.list().data] == ["gpu-model"]
    resp = client.chat.completions.create(model="gpu-model", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8)
    assert resp.model == "gpu-model"
    assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(
        model="gpu-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"gpu-model"}
    assert chunks[-1].usage is not None
    # The context window from the config is enforced at the gateway.
    r = httpx.post(gw_static.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {gw_static.member_key}"},
                   json={"model": "gpu-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_engine_metrics_are_scraped_through_the_vllm_adapter(gw_static: Gateway) -> None:
    def scraped() -> bool:
        load = gw_static.replicas()[0]["engine_load"]
        return load["kv_cache_usage"] is not None

    wait_until(scraped, 10, 0.1, "a metrics scrape of the static replica")
    replica = gw_static.replicas()[0]
    assert replica["engine"] == "sim" and replica["pool"] == "static" and replica["state"] == "ready"
    assert 0.0 <= replica["engine_load"]["kv_cache_usage"] <= 1.0
