"""The controller inside `skyfleet serve` with the Kubernetes provider, as the rendered gateway runs it: the
rendered gateway.yaml and fleet.yaml, the rendered StatefulSets and Role on the fake API server
(tests/fakes/k8s_api.py, through the real kubernetes client), a real store. And leadership: with PostgreSQL
only the gateway holding the advisory lock runs the controller (real server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.ext.asyncio import create_async_engine

from skyfleet.clock import ManualClock
from skyfleet.config import ConfigError, Settings
from skyfleet.cost.catalog import Catalog
from skyfleet.cost.pricing import Pricing
from skyfleet.engines.kvstate import KvRouter
from skyfleet.fleet.k8s.render import render
from skyfleet.fleet.leader import AdvisoryLeadership, AlwaysLeader, leadership_for
from skyfleet.fleet.providers.base import PreemptionNotice
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState
from skyfleet.fleet.serving import ServedFleet, held_for_slots
from skyfleet.fleet.spec import load_fleet_spec
from skyfleet.fleet.status import fleet_status
from skyfleet.state import Store
from tests.fakes.k8s_api import FakeKubernetesApi
from tests.k8s.test_provider import TOKEN, make_client

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet-3-pools.yaml"
MODEL = "llama-3.1-8b-instruct"



def rendered(tmp_path: Path) -> tuple[list[dict[str, Any]], Settings]:
    catalog = Catalog.builtin()
    objects = render(load_fleet_spec(EXAMPLE, catalog), catalog)
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (tmp_path / "fleet.yaml").write_text(cm["data"]["fleet.yaml"])
    raw = yaml.safe_load(cm["data"]["gateway.yaml"])
    raw["fleet_spec"] = str(tmp_path / "fleet.yaml")  # mounted at /etc/skyfleet in the pod
    raw["fleet"] = {**raw["fleet"], "kubernetes_namespace": "skyfleet"}
    raw["data_dir"] = str(tmp_path / "data")
    return objects, Settings(**raw)


async def test_the_rendered_gateway_runs_the_controller_on_the_rendered_statefulsets(tmp_path: Path,
                                                                                    store: Store) -> None:
    objects, settings = rendered(tmp_path)
    (role,) = [o for o in objects if o["kind"] == "Role"]
    registry = ReplicaRegistry()
    for i, r in enumerate(settings.static_replicas):  # what register_static does, without probing
        registry.add(ReplicaSpec(id=f"static-{i}", base_url=r.url, model=r.model, engine=r.engine,
                                 upstream_model=r.model, pool=r.pool or "static", tier=r.tier),
                     state=ReplicaState.READY)
    with FakeKubernetesApi(token=TOKEN, rbac_rules=role["rules"]) as k8s:
        for obj in objects:
            if obj["kind"] == "StatefulSet":
                k8s.add_statefulset_object(obj)
        client = make_client(k8s.url)
        try:
            clock = ManualClock(wall_offset=1_750_000_000.0)
            fleet = ServedFleet.build(settings, store_engine=store.engine, registry=registry, provider=None,
                                     pricing=Pricing.from_settings(settings), clock=clock, kv=KvRouter({}),
                                     recorder=None, api_client=client)
            assert fleet.local is None and isinstance(fleet.controller._leadership, AlwaysLeader)  # SQLite
            assert MODEL in registry.models()
            await fleet.controller.start()
            decisions = await fleet.controller.round()
            assert decisions is not None and fleet.controller.leader
            decision = decisions[MODEL]
            for pool, n in decision.desired.items():  # carried out through the scale subresource
                sts = next(o for o in objects if o["kind"] == "StatefulSet"
                           and o["metadata"]["labels"].get("skyfleet.io/pool") == pool)
                assert k8s.scale_of("skyfleet", sts["metadata"]["name"])[0] == n
            # a preemption notice for a pod takes the static replica with that host out of routing
            victim = next(e for e in registry.entries.values() if e.spec.tier == "spot")
            pod = victim.spec.base_url.split("//", 1)[1].split(".", 1)[0]
            await fleet.controller.on_preemption(PreemptionNotice(
                pod, f"{MODEL}/{victim.spec.pool}", datetime.now(UTC) + timedelta(seconds=120)))
            assert victim.state is ReplicaState.DRAINING
            status = await fleet_status(fleet, registry, clock)
            assert status["provider"] == "kubernetes" and status["leader"] is True
            pools = {p["pool"]: p for p in status["models"][0]["pools"]}
            assert pools["l40s-spot"]["usd_per_hour_each"] == Catalog.builtin().get(
                "g6e.xlarge", "us-east-1").spot_usd_per_hr
        finally:
            client.close()


def test_local_pools_are_refused_with_the_kubernetes_provider(tmp_path: Path, store: Store) -> None:
    spec = tmp_path / "local.yaml"
    spec.write_text(yaml.safe_dump({"models": {"m": {"pools": [
        {"name": "a", "instance_type": "local", "region": "local", "tier": "on-demand", "max": 1}]}}}))
    settings = Settings(fleet_spec=spec, fleet={"provider": "kubernetes"}, data_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match=r"models.m.pools\[0\]: instance_type local"):
        ServedFleet.build(settings, store_engine=store.engine, registry=ReplicaRegistry(), provider=None,
                         pricing=Pricing.from_settings(settings), clock=ManualClock(), kv=KvRouter({}),
                         recorder=None, api_client=object())


async def test_only_one_gateway_leads_and_another_takes_over(pg_database_url: str) -> None:
    one, two = create_async_engine(pg_database_url), create_async_engine(pg_database_url)
    try:
        first, second = leadership_for(one, True), leadership_for(two, True)
        assert isinstance(first, AdvisoryLeadership)
        assert await first.held() is True
        assert await second.held() is False
        assert await first.held() is True  # still its own
        await first.release()  # that gateway stops (or its connection drops)
        assert await second.held() is True
        assert await first.held() is False
        await second.release()
        assert isinstance(leadership_for(one, False), AlwaysLeader)
    finally:
        await one.dispose()
        await two.dispose()


def test_only_requests_held_for_llamacpp_slots_count_as_the_gateways_queue() -> None:
    # vLLM queues what it cannot batch and reports it as `waiting`; counting the gateway's in-flight
    # requests beyond a vLLM replica's capacity too would count them twice (and scale up for nothing).
    registry = ReplicaRegistry()
    for rid, engine, model in (("l0", "llama", "m"), ("v0", "vllm", "m"), ("l1", "llama", "other")):
        e = registry.add(ReplicaSpec(id=rid, base_url=f"http://{rid}:1", model=model, engine=engine,
                                     upstream_model=model), capacity=2, state=ReplicaState.READY)
        e.outstanding = 5
    assert held_for_slots(registry.entries.values(), "m") == 3
    registry.set_state("l0", ReplicaState.DRAINING)
    assert held_for_slots(registry.entries.values(), "m") == 0
