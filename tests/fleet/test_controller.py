"""The controller loop on a real SQLite store with a fake provider (behind the FleetProvider protocol) and a
ManualClock: decisions recorded before acting, pools scaled, failures retried with backoff and shown in the
status without stopping the loop, a restarted controller resuming without churn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from skyfleet.clock import ManualClock
from skyfleet.engines.metrics import EngineMetrics
from skyfleet.errors import ServiceUnavailableError
from skyfleet.fleet.controller import FleetController
from skyfleet.fleet.providers.base import FleetProvider, PreemptionNotice, ReplicaInfo
from skyfleet.fleet.spec import FleetSpec, parse_fleet_spec
from skyfleet.state import Store
from skyfleet.state.fleet import FleetRepository
from tests.fleet.sim import CATALOG

WALL0 = 1_750_000_000.0


class FakeProvider:
    """Records what it is asked; ``fail`` makes the next N ``set_replicas`` calls raise, as a provider's
    boundary does (ProviderUnavailableError is a ServiceUnavailableError)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.drained: list[str] = []
        self.fail = 0

    async def set_replicas(self, pool: str, n: int) -> None:
        self.calls.append((pool, n))
        if self.fail:
            self.fail -= 1
            raise ServiceUnavailableError("provider down")
        self.sizes[pool] = n

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        return []

    async def drain(self, replica_id: str) -> None:
        self.drained.append(replica_id)

    async def delete_replica(self, replica_id: str) -> None:
        pass

    async def events(self) -> AsyncIterator[PreemptionNotice]:  # pragma: no cover - not used here
        return
        yield


def spec() -> FleetSpec:
    return parse_fleet_spec({"models": {"m": {
        "on_demand_floor": 1,
        "pools": [
            {"name": "spot", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "spot", "max": 4,
             "tokens_per_s": 1000},
            {"name": "od", "instance_type": "g6e.xlarge", "region": "us-east-1", "tier": "on-demand", "min": 1,
             "max": 2, "tokens_per_s": 1000}],
        "scaling": {"window_s": 30, "up_stabilisation_s": 20, "down_stabilisation_s": 60, "cooldown_s": 30}}}},
        CATALOG)


def metrics(generated: float, waiting: float) -> EngineMetrics:
    return EngineMetrics(engine="vllm", requests_running=4, requests_waiting=waiting, kv_cache_usage=0.5,
                         prompt_tokens_total=generated, generation_tokens_total=generated,
                         cached_prompt_tokens_total=None, requests_total=None, ttft_seconds=None,
                         tpot_seconds=None, e2e_seconds=None, queue_seconds=None)



def controller(store: Store, provider: FakeProvider, clock: ManualClock, **kw: Any) -> FleetController:
    assert isinstance(provider, FleetProvider)
    return FleetController(spec(), provider, FleetRepository(store.engine), CATALOG, clock, **kw)


async def drive(c: FleetController, clock: ManualClock, ticks: int, *, tps: float, waiting: float,
                generated: list[float]) -> None:
    for _ in range(ticks):
        clock.advance(10)
        generated[0] += tps * 10
        c.observe("m", "od-0", "od", metrics(generated[0], waiting))
        await c.tick()


async def test_decisions_are_recorded_then_carried_out(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), FakeProvider()
    c = controller(store, provider, clock)
    await c.start()
    gen = [0.0]
    await drive(c, clock, 5, tps=1000, waiting=3, generated=gen)
    assert provider.sizes["m/od"] >= 1 and provider.sizes["m/spot"] >= 1  # scaled up onto spot
    history = await FleetRepository(store.engine).list_decisions("m")
    assert len(history) == 5 and history[0].decision["desired"] == {"od": provider.sizes["m/od"],
                                                                      "spot": provider.sizes["m/spot"]}
    assert history[0].inputs["waiting_mean"] == 3
    status = c.status()["m"]
    assert status["pools"]["spot"]["applied"] == provider.sizes["m/spot"] and status["record_error"] is None


async def test_a_failing_provider_is_retried_with_backoff_and_shown_never_fatal(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), FakeProvider()
    c = controller(store, provider, clock, retry_base_s=15, retry_max_s=40)
    await c.start()
    provider.fail = 100
    gen = [0.0]
    await drive(c, clock, 8, tps=100, waiting=0, generated=gen)
    od_calls = [t for t in range(len(provider.calls)) if provider.calls[t][0] == "m/od"]
    # Ticks every 10 s; after failures the pool waits 15, 30, 40, 40 s: tried at ticks 1, 3, 6 (and not between).
    assert len(od_calls) == 3
    st = c.status()["m"]["pools"]["od"]
    assert st["failures"] == 3 and "provider down" in st["last_error"] and st["applied"] is None
    provider.fail = 0
    await drive(c, clock, 5, tps=100, waiting=0, generated=gen)
    st = c.status()["m"]["pools"]["od"]
    assert (st["failures"], st["last_error"], st["applied"]) == (0, None, 1) and provider.sizes["m/od"] == 1


async def test_a_store_failure_means_no_action_and_no_state_change(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), FakeProvider()
    c = controller(store, provider, clock)
    await c.start()
    async with store.engine.begin() as conn:  # the store stops accepting decisions
        await conn.execute(text("DROP TABLE fleet_decisions"))
    gen = [0.0]
    await drive(c, clock, 2, tps=100, waiting=5, generated=gen)
    assert provider.calls == [] and "ServiceUnavailableError" in c.status()["m"]["record_error"]
    assert c.status()["m"]["desired"] is None  # nothing was acted on, the state did not move


async def test_a_restarted_controller_resumes_without_churn(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), FakeProvider()
    first = controller(store, provider, clock)
    await first.start()
    gen = [0.0]
    await drive(first, clock, 6, tps=2500, waiting=2, generated=gen)
    await drive(first, clock, 3, tps=2500, waiting=0, generated=gen)
    sizes = dict(provider.sizes)
    assert sum(sizes.values()) >= 3
    # A new process: same store, empty window. Its first rounds see nothing yet, then the same load.
    second = controller(store, provider, clock)
    await second.start()
    provider.calls.clear()
    clock.advance(10)
    await second.tick()
    await drive(second, clock, 2, tps=2500, waiting=0, generated=gen)
    assert provider.sizes == sizes and {n for _, n in provider.calls} <= set(sizes.values())
    assert provider.drained == []


async def test_an_unreadable_saved_state_starts_afresh(store: Store) -> None:
    await FleetRepository(store.engine).save_state("m", {"version": 99}, datetime.fromtimestamp(WALL0, UTC))
    clock, provider = ManualClock(wall_offset=WALL0), FakeProvider()
    c = controller(store, provider, clock)
    await c.start()
    clock.advance(10)
    decisions = await c.tick()
    assert decisions["m"].total == 1 and provider.sizes == {"m/od": 1, "m/spot": 0}
