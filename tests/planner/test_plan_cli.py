"""`skyfleet plan` end to end on the real Azure conversation trace with the built-in catalog and profiles:
its fleet spec loads unchanged and runs in the fleet controller; impossible SLOs and bad arguments exit 2
with a clear message."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from skyfleet.cli.app import app
from skyfleet.clock import ManualClock
from skyfleet.cost.catalog import Catalog
from skyfleet.fleet.controller import FleetController
from skyfleet.fleet.providers.base import FleetProvider, PreemptionNotice, ReplicaInfo
from skyfleet.fleet.spec import load_fleet_spec
from skyfleet.state import Store
from skyfleet.state.fleet import FleetRepository
from tests.planner.shared_data import DATA

AZURE = DATA / "azure_llm_2023_conv.csv"
BASE = ["plan", "--trace", str(AZURE), "--model", "llama-3.1-8b"]


def plan(*args: str) -> tuple[int, str, str]:
    assert AZURE.is_file(), f"missing {AZURE} (shared data)"
    result = CliRunner().invoke(app, [*BASE, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


class RecordingProvider:
    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    async def set_replicas(self, pool: str, n: int) -> None:
        self.sizes[pool] = n

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        return []

    async def drain(self, replica_id: str) -> None:
        pass

    async def delete_replica(self, replica_id: str) -> None:
        pass

    async def events(self) -> AsyncIterator[PreemptionNotice]:  # pragma: no cover - not used here
        return
        yield



async def test_the_planned_fleet_spec_loads_into_the_controller_unchanged(tmp_path: Path, store: Store) -> None:
    out = tmp_path / "fleet.yaml"
    code, stdout, stderr = plan("--ttft-p95", "1.0", "--tpot-p95", "0.1", "--on-demand-floor", "1",
                                "--slice", "0:45m", "--window", "15m", "--region", "us-east-1",
                                "--region", "us-east-2", "--out", str(out), "--format", "json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["status"] == "optimal" and report["trace"]["requests"] > 10_000
    assert len(report["windows"]) == 3 and report["cost_usd"] > 0
    assert report["fleet_spec"] == yaml.safe_load(out.read_text())

    catalog = Catalog.builtin()
    spec = load_fleet_spec(out, catalog)
    fleet = spec.models["llama-3.1-8b"]
    assert fleet.engine == "vllm" and fleet.on_demand_floor == 1
    assert (fleet.slo.ttft_p95_s, fleet.slo.tpot_p95_s) == (1.0, 0.1)
    assert {p.region for p in fleet.pools} <= {"us-east-1", "us-east-2"}
    assert all(p.tokens_per_s and p.tokens_per_s > 0 for p in fleet.pools)
    totals = [sum(w["replicas"].values()) for w in report["windows"]]
    assert all(t >= 1 for t in totals)
    if len(set(totals)) > 1:  # the plan varies over the trace's time of day: one schedule per window
        assert [s.min for s in fleet.schedules] == totals and all(s.timezone == "UTC" for s in fleet.schedules)

    start = report["trace"]["start_epoch"]
    for offset in (20 * 60.0, 12 * 3600.0):  # inside the second window; and at another time of day
        provider = RecordingProvider()
        assert isinstance(provider, FleetProvider)
        clock = ManualClock(wall_offset=start + offset)
        controller = FleetController(spec, provider, FleetRepository(store.engine), catalog, clock)
        await controller.start()
        decision = (await controller.tick())["llama-3.1-8b"]
        lo, hi = fleet.bounds(clock.wall())
        total = sum(decision.desired.values())
        assert max(lo, 1) <= total <= hi, decision.reason
        for p in fleet.pools:
            assert 0 <= decision.desired[p.name] <= p.max
            assert provider.sizes[f"llama-3.1-8b/{p.name}"] == decision.desired[p.name]
        on_demand = sum(decision.desired[p.name] for p in fleet.pools if p.tier == "on-demand")
        assert on_demand >= min(fleet.on_demand_floor, total)
        if offset == 20 * 60.0 and fleet.schedules:
            assert total == totals[1]  # the plan's count for that window, pre-provisioned


def test_the_table_shows_the_mix_totals_and_the_types_that_miss_the_slo(tmp_path: Path) -> None:
    code, stdout, stderr = plan("--ttft-p95", "1.0", "--tpot-p95", "0.1", "--slice", "0:30m", "--window", "10m")
    assert code == 0, stderr
    assert "Plan per window" in stdout and "Total $" in stdout and "solver optimal" in stdout
    assert "2023-11-16 18:15:46" in stdout and "Cheapest single option" in stdout
    assert "Cannot meet the SLO" in stdout and "at best > SLO 1 s" in stdout  # e.g. the A10G's TTFT
    assert "Fleet spec not written" in stdout


def test_a_faster_rate_costs_more_per_hour(tmp_path: Path) -> None:
    per_hour, peaks = [], []
    for rate in ("1", "2.5"):  # the 20 minutes replayed 2.5 times as fast: 8 minutes of 2.5x the load
        code, stdout, stderr = plan("--ttft-p95", "1.0", "--tpot-p95", "0.1", "--slice", "0:20m", "--rate", rate,
                                    "--window", "4m", "--format", "json")
        assert code == 0, stderr
        report = json.loads(stdout)
        hours = sum(w["end_s"] - w["start_s"] for w in report["windows"]) / 3600
        per_hour.append(report["cost_usd"] / hours)
        peaks.append(max(w["peak_requests_per_s"] for w in report["windows"]))
    assert peaks[1] > 2 * peaks[0] and per_hour[1] > per_hour[0]


def test_an_slo_no_instance_type_meets_exits_2_with_the_best_values(tmp_path: Path) -> None:
    code, _, stderr = plan("--ttft-p95", "0.02", "--tpot-p95", "0.1", "--slice", "0:10m",
                           "--out", str(tmp_path / "f.yaml"))
    assert code == 2 and not (tmp_path / "f.yaml").exists()
    assert "no instance type meets the SLO (TTFT p95 0.02 s, TPOT p95 0.1 s)" in stderr
    assert "g6e.xlarge (1x L40S, 1 GPU/replica): TTFT" in stderr and "at best > SLO 0.02 s" in stderr
    code, _, stderr = plan("--ttft-p95", "5", "--tpot-p95", "0.001", "--slice", "0:10m")
    assert code == 2 and "TPOT" in stderr and "at best > SLO 0.001 s" in stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--window", "fifteen"], "'fifteen' is not a duration"),
    (["--window", "0"], "longer than 0 s"),
    (["--slice", "600"], "is not START:END"),
    (["--slice", "20m:10m"], "END must be after START"),
    (["--slice", "a:b"], "'a' is not a duration"),
    (["--rate", "0"], "must be a positive number"),
    (["--format", "xml"], "'xml' is not one of table, json"),
    (["--region", "mars-1"], "region(s) not in the instance catalog: mars-1"),
])
def test_bad_arguments_get_a_clear_error(args: list[str], message: str) -> None:
    code, _, stderr = plan("--ttft-p95", "1", "--tpot-p95", "0.1", *args)
    assert code == 2 and message in " ".join(stderr.replace("│", " ").split()), stderr


def test_an_unknown_model_or_an_empty_slice_is_explained() -> None:
    code, _, stderr = plan("--ttft-p95", "1", "--tpot-p95", "0.1", "--model", "gpt-9", "--slice", "0:5m")
    assert code == 2 and "no instance type has an engine profile for gpt-9 on vllm" in stderr
    code, _, stderr = plan("--ttft-p95", "1", "--tpot-p95", "0.1", "--slice", "5h:6h")
    assert code == 2 and "the trace has no request" in stderr


def test_a_profiles_file_replaces_the_builtin_profiles(tmp_path: Path) -> None:
    book = tmp_path / "profiles.yaml"
    book.write_text(yaml.safe_dump({"profiles": [{
        "gpu": "L4", "gpus": 1, "model": "llama-3.1-8b", "engine": "vllm", "prefill_tokens_per_s": 20000.0,
        "ttft_base_s": 0.05, "tpot_base_s": 0.02, "tpot_batch_slope": 0.02, "kv_capacity_tokens": 60000,
        "max_num_seqs": 128, "cold_start_s": 300.0, "source": "test"}]}))
    code, stdout, stderr = plan("--ttft-p95", "1", "--tpot-p95", "0.1", "--slice", "0:10m", "--profiles", str(book),
                                "--format", "json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert {o["gpu"] for o in report["options"]} == {"L4"} and report["infeasible"] == []
    code, _, stderr = plan("--ttft-p95", "1", "--tpot-p95", "0.1", "--profiles", str(tmp_path / "none.yaml"))
    assert code == 2 and "no such profiles file" in stderr
