"""The measuring core: the fits (hypothesis), engine probing (vLLM /metrics, llama.cpp /props) through a
mock transport, and real sweeps against skyfleet's simulated engine (known ground truth) and the
embedded llama.cpp replica, plus `skyfleet profile` end to end."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from skyfleet.planner.measure import (
    EngineInfo,
    MeasureError,
    Measurement,
    SweepPlan,
    fit_decode,
    fit_prefill,
    probe_engine,
    run_sweep,
    to_profile,
)
from skyfleet.planner.profiles import read_profile

# -- the fits --------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.floats(0.0, 2.0), st.floats(10.0, 1e5), st.lists(st.integers(1, 100_000), min_size=2, max_size=20,
                                                          unique=True))
def test_fit_prefill_recovers_a_line(base: float, rate: float, tokens: list[int]) -> None:
    ttft = [base + n / rate for n in tokens]
    b, r, notes = fit_prefill(tokens, ttft)
    assert b == pytest.approx(base, abs=1e-6 + 1e-9 * max(tokens) / rate * 1e3)
    assert r == pytest.approx(rate, rel=1e-6)
    assert notes == []


@settings(max_examples=80, deadline=None)
@given(st.floats(1e-4, 1.0), st.floats(0.0, 3.0), st.lists(st.integers(1, 256), min_size=2, max_size=9, unique=True))
def test_fit_decode_recovers_base_and_slope(tpot: float, slope: float, batches: list[int]) -> None:
    itl = [tpot * (1 + slope * (b - 1)) for b in batches]
    a, s, notes = fit_decode(batches, itl)
    assert a == pytest.approx(tpot, rel=1e-6) and s == pytest.approx(slope, rel=1e-6, abs=1e-9)
    assert notes == []


def test_fits_clamp_noise_and_refuse_nonsense() -> None:
    b, r, notes = fit_prefill([100, 200, 300], [0.09, 0.2, 0.31])  # intercept -0.0133 -> 0
    assert b == 0.0 and r == pytest.approx(1 / 0.0011) and "clamped to 0" in notes[0]
    a, s, notes = fit_decode([1, 2, 4], [0.02, 0.019, 0.018])
    assert s == 0.0 and a > 0 and "clamped to 0" in notes[0]
    with pytest.raises(MeasureError, match="did not grow"):
        fit_prefill([100, 200], [0.5, 0.4])
    with pytest.raises(MeasureError, match="two or more different"):
        fit_decode([4, 4], [0.1, 0.2])


def test_geometric_plan() -> None:
    plan = SweepPlan.geometric(max_prompt_tokens=300, max_concurrency=6, prefill_repeats=2, decode_rounds=1)
    assert plan.prompt_lengths == (32, 64, 128, 256, 300) and plan.concurrencies == (1, 2, 4, 6)
    assert plan.requests == 1 + 5 * 2 + (1 + 2 + 4 + 6)


# -- probing -------------------------------------------------------------------------------------------------------

VLLM_METRICS = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",gpu_memory_utilization="0.9",num_gpu_blocks="27802"} 1.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 0.0
"""


def _transport(routes: dict[str, httpx.Response]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        return routes.get(request.url.path, httpx.Response(404, text="not found"))
    return httpx.MockTransport(handle)


async def test_probe_vllm_reads_the_kv_cache_from_metrics() -> None:
    routes = {"/v1/models": httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 8192}]}),
              "/metrics": httpx.Response(200, text=VLLM_METRICS)}
    async with httpx.AsyncClient(transport=_transport(routes), base_url="http://e") as client:
        info = await probe_engine(client)
    assert info == EngineInfo(model="m", engine="vllm", kv_capacity_tokens=27802 * 16, max_num_seqs=None,
                              max_model_len=8192)


async def test_probe_llamacpp_reads_props_and_unknown_engines_say_nothing() -> None:
    routes = {"/v1/models": httpx.Response(200, json={"data": [{"id": "tiny"}]}),
              "/props": httpx.Response(200, json={"total_slots": 3, "default_generation_settings": {"n_ctx": 2048}})}
    async with httpx.AsyncClient(transport=_transport(routes), base_url="http://e") as client:
        assert await probe_engine(client) == EngineInfo("tiny", "llama", 6144, 3, 2048)
    routes = {"/v1/models": httpx.Response(200, json={"data": [{"id": "x"}, {"id": "y"}]})}
    async with httpx.AsyncClient(transport=_transport(routes), base_url="http://e") as client:
        assert await probe_engine(client, "y") == EngineInfo("y", None, None, None, None)
    routes = {"/v1/models": httpx.Response(401, text="no key")}
    async with httpx.AsyncClient(transport=_transport(routes), base_url="http://e") as client:
        with pytest.raises(MeasureError, match="401"):
            await probe_engine(client)


def test_to_profile_needs_a_kv_size_and_says_where_numbers_came_from() -> None:
    m = Measurement(samples=(), ttft_base_s=0.01, prefill_tokens_per_s=500.0, tpot_base_s=0.02,
                    tpot_batch_slope=0.1, notes=("a note",))
    unknown = EngineInfo("m", None, None, None, None)
    with pytest.raises(MeasureError, match="--kv-capacity"):
        to_profile(m, unknown, gpu="L4", gpus=1, endpoint="http://e", cold_start_s=60, cold_start_note="given")
    p = to_profile(m, unknown, gpu="L4", gpus=1, endpoint="http://e", cold_start_s=60, cold_start_note="given",
                   kv_capacity_tokens=1000, engine="vllm")
    assert (p.kv_capacity_tokens, p.max_num_seqs, p.max_model_len, p.engine) == (1000, 256, 1000, "vllm")
    assert p.source.startswith("measured: http://e ") and p.source.endswith("(0 requests); cold_start_s: given; a note")


# -- real engines ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "skyfleet", "engine", *args, "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the engine exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the engine did not become healthy in 60 s"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real llama.cpp replica (SmolLM2-135M), one thread (steadier on a shared host), four slots."""
    proc, base = _start(["llama", "--threads", "1", "--slots", "4", "--ctx-size", "4096"],
                        tmp_path_factory.mktemp("llama") / "llama.log")
    yield base
    _stop(proc)


async def test_sweep_recovers_the_simulated_engines_profile(tmp_path: Path) -> None:
    """skyfleet's simulated engine runs a known timing model: the measured fit must find it again."""
    truth = {"ttft_base_s": 0.03, "prefill_tokens_per_s": 4000.0, "tpot_base_s": 0.01, "tpot_batch_slope": 0.2,
             "kv_capacity_tokens": 65536, "max_num_seqs": 16}
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(truth))
    proc, base = _start(["sim", "--profile", str(tmp_path / "sim.yaml")], tmp_path / "sim.log")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            info = await probe_engine(client)
            plan = SweepPlan(prompt_lengths=(32, 128, 512), prefill_repeats=2, concurrencies=(1, 2, 4, 8),
                             decode_rounds=1, decode_output_tokens=24)
            m = await run_sweep(client, info.model, plan)
    finally:
        _stop(proc)
    assert m.prefill_tokens_per_s == pytest.approx(truth["prefill_tokens_per_s"], rel=0.15)
    assert m.ttft_base_s == pytest.approx(truth["ttft_base_s"], abs=0.01)
    assert m.tpot_base_s == pytest.approx(truth["tpot_base_s"], rel=0.15)
    assert m.tpot_batch_slope == pytest.approx(truth["tpot_batch_slope"], rel=0.3)


async def test_sweep_against_the_real_llamacpp_replica(llama: str) -> None:
    seen: list[str] = []
    async with httpx.AsyncClient(base_url=llama, timeout=60) as client:
        info = await probe_engine(client)
        assert (info.engine, info.kv_capacity_tokens, info.max_num_seqs, info.max_model_len) == ("llama", 4096, 4, 1024)
        plan = SweepPlan(prompt_lengths=(32, 64, 128, 256), prefill_repeats=2, concurrencies=(1, 2, 4),
                         decode_rounds=1, decode_output_tokens=16)
        m = await run_sweep(client, info.model, plan, progress=lambda s: seen.append(s.phase))
    assert len(seen) == m.requests == plan.requests
    for value in (m.prefill_tokens_per_s, m.tpot_base_s, m.ttft_base_s, m.tpot_batch_slope):
        assert math.isfinite(value) and value >= 0
    assert m.prefill_tokens_per_s > 0 and m.tpot_base_s > 0
    pre = [s for s in m.samples if s.phase == "prefill"]
    assert all(s.output_tokens == plan.prefill_output_tokens and abs(s.prompt_tokens - s.target_tokens) <= 8
               for s in pre)
    observed = float(np.mean([s.ttft_s for s in pre]))
    predicted = float(np.mean([m.predicted_ttft(s.prompt_tokens) for s in pre]))
    assert predicted == pytest.approx(observed, rel=0.3), (predicted, observed)
    dec = [s for s in m.samples if s.phase == "decode"]
    assert all(s.output_tokens == 16 and s.itl_s is not None for s in dec)
    observed_tpot = float(np.mean([s.itl_s or 0.0 for s in dec]))
    predicted_tpot = float(np.mean([m.predicted_tpot(s.concurrency) for s in dec]))
    assert predicted_tpot == pytest.approx(observed_tpot, rel=0.3), (predicted_tpot, observed_tpot)


def test_skyfleet_profile_writes_a_profile(llama: str, tmp_path: Path) -> None:
    from skyfleet.cli.app import app

    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(app, [
        "profile", "--endpoint", f"{llama}/v1", "--gpu", "cpu", "--gpus", "1", "--out", str(out),
        "--max-prompt-tokens", "128", "--max-concurrency", "2", "--repeats", "1", "--rounds", "1",
        "--output-tokens", "8", "--cold-start", "2.5"])
    assert result.exit_code == 0, result.output
    p = read_profile(out)
    assert (p.gpu, p.gpus, p.engine, p.kv_capacity_tokens, p.max_num_seqs, p.cold_start_s) == \
        ("cpu", 1, "llama", 4096, 4, 2.5)
    assert p.source.startswith(f"measured: {llama} ") and "(7 requests); cold_start_s: given (2.5 s)" in p.source
    assert out.read_text().startswith("# written by `skyfleet profile`")
    bad = CliRunner().invoke(app, ["profile", "--endpoint", "http://127.0.0.1:9", "--gpu", "x", "--gpus", "1",
                                   "--out", str(tmp_path / "never.yaml"), "--timeout", "2"])
    assert bad.exit_code == 1 and not (tmp_path / "never.yaml").exists()
