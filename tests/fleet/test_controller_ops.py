"""The controller's operations beyond the policy: a pool without capacity (the on-demand fallback), manual pins
(persisted across a restart), preemption notices (recorded, hooks called, a round at once), and the gateway's
cold-start queue. Real SQLite store, ManualClock, a provider fake behind the FleetProvider protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from skyfleet.clock import ManualClock
from skyfleet.errors import NoReplicaAvailableError
from skyfleet.fleet.controller import FleetController, FleetTargetError
from skyfleet.fleet.providers.base import InsufficientCapacityError, PreemptionNotice, ReplicaInfo
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState
from skyfleet.gateway.admission import ColdStartQueue
from skyfleet.state import Store
from skyfleet.state.fleet import FleetRepository
from tests.fleet.sim import CATALOG
from tests.fleet.test_controller import WALL0, FakeProvider, metrics, spec


class CapacityProvider(FakeProvider):
    """Spot capacity can run out: growing the spot pool then raises InsufficientCapacityError."""

    def __init__(self) -> None:
        super().__init__()
        self.spot_capacity: int | None = None
        self.notices: asyncio.Queue[PreemptionNotice] = asyncio.Queue()

    async def set_replicas(self, pool: str, n: int) -> None:
        if pool == "m/spot" and self.spot_capacity is not None and n > self.spot_capacity:
            self.calls.append((pool, n))
            raise InsufficientCapacityError("no spot capacity")
        await super().set_replicas(pool, n)

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        n = self.sizes.get(pool, 0)
        if pool == "m/spot" and self.spot_capacity is not None:
            n = min(n, self.spot_capacity)
        return [ReplicaInfo(id=f"{pool}-{i}", pool=pool, state=ReplicaState.READY) for i in range(n)]

    async def events(self) -> AsyncIterator[PreemptionNotice]:  # type: ignore[override]
        while True:
            yield await self.notices.get()



def make(store: Store, provider: CapacityProvider, clock: ManualClock, **kw: float) -> FleetController:
    return FleetController(spec(), provider, FleetRepository(store.engine), CATALOG, clock, **kw)  # type: ignore[arg-type]


async def run(c: FleetController, clock: ManualClock, ticks: int, gen: list[float], *, tps: float,
              waiting: float) -> None:
    for _ in range(ticks):
        clock.advance(10)
        gen[0] += tps * 10
        c.observe("m", "od-0", "od", metrics(gen[0], waiting))
        await c.tick()


async def test_no_spot_capacity_falls_back_to_on_demand_until_retried(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), CapacityProvider()
    c = make(store, provider, clock, retry_base_s=60, retry_max_s=60)
    await c.start()
    gen = [0.0]
    await run(c, clock, 6, gen, tps=2500, waiting=3)  # grows: 1 on-demand (the floor) + spot
    assert provider.sizes["m/spot"] >= 2
    provider.spot_capacity = 1  # a spot replica is reclaimed and none can be had
    await run(c, clock, 6, gen, tps=2500, waiting=3)
    st = c.status()["m"]["pools"]["spot"]
    assert st["no_capacity"] is True and "no spot capacity" in st["last_error"]
    # the policy saw the spot pool capped at what it has: the on-demand pool took the rest (its max is 2)
    assert c.status()["m"]["desired"]["spot"] == 1 and provider.sizes["m/od"] == 2
    provider.spot_capacity = None  # capacity is back: the pool is retried after its backoff and accepted
    await run(c, clock, 8, gen, tps=2500, waiting=3)
    st = c.status()["m"]["pools"]["spot"]
    assert st["no_capacity"] is False and st["failures"] == 0


async def test_a_pin_fixes_a_pool_and_survives_a_restart(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), CapacityProvider()
    c = make(store, provider, clock)
    await c.start()
    await c.scale("m", "spot", 3)
    gen = [0.0]
    await run(c, clock, 3, gen, tps=0, waiting=0)  # idle: the policy would hold the minimum, the pin wins
    assert provider.sizes["m/spot"] == 3
    again = make(store, provider, clock)
    await again.start()
    await run(again, clock, 2, gen, tps=0, waiting=0)
    assert provider.sizes["m/spot"] == 3 and again.status()["m"]["pins"] == {"spot": 3}
    await again.scale("m", "spot", None)
    assert again.status()["m"]["pins"] == {}
    with pytest.raises(FleetTargetError, match="holds 0 to 4"):
        await again.scale("m", "spot", 5)
    with pytest.raises(FleetTargetError, match="no pool 'gpu'"):
        await again.scale("m", "gpu", 1)
    with pytest.raises(FleetTargetError, match="no model 'x'"):
        await again.scale("x", "spot", 1)
    reasons = [d.reason for d in await FleetRepository(store.engine).list_decisions("m")]
    assert "manual: pool spot pinned to 3" in reasons and "manual: pool spot released" in reasons


async def test_a_preemption_notice_is_recorded_passed_on_and_runs_a_round(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), CapacityProvider()
    c = make(store, provider, clock, interval_s=3600)
    await c.start()
    seen: list[str] = []

    async def hook(notice: PreemptionNotice) -> None:
        seen.append(notice.replica_id)

    c.on_notice.append(hook)
    runner = asyncio.create_task(c.run())
    watcher = asyncio.create_task(c.watch_events())
    try:
        while not (await FleetRepository(store.engine).list_decisions("m")):  # the first round
            await asyncio.sleep(0)
        deadline = datetime.fromtimestamp(WALL0, UTC) + timedelta(seconds=120)
        provider.notices.put_nowait(PreemptionNotice("spot-0", "m/spot", deadline))
        async with asyncio.timeout(5):
            while len(await FleetRepository(store.engine).list_decisions("m")) < 3:  # notice + the round it runs
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        watcher.cancel()
        await asyncio.gather(runner, watcher, return_exceptions=True)
    assert seen == ["spot-0"] and c.status()["m"]["pools"]["spot"]["preemptions"] == 1
    reasons = [d.reason for d in await FleetRepository(store.engine).list_decisions("m")]
    assert any(r.startswith("preempted: spot-0 gone by") for r in reasons)


def _replica(rid: str) -> ReplicaSpec:
    return ReplicaSpec(id=rid, base_url="http://127.0.0.1:1", model="m", engine="llama", upstream_model="m")


async def test_the_cold_start_queue_waits_for_a_replica_and_wakes_the_controller() -> None:
    registry, clock = ReplicaRegistry(), ManualClock()
    woke: list[str] = []
    q = ColdStartQueue(registry, clock, frozenset({"m"}), max_wait_s=30)
    q.on_wait.append(woke.append)
    waiter = asyncio.create_task(q.wait_for_replica("m"))
    while q.depth("m") == 0:
        await asyncio.sleep(0)
    assert woke == ["m"] and not waiter.done()
    registry.add(_replica("r0"))  # starting: not yet
    await asyncio.sleep(0)
    assert not waiter.done()
    registry.set_state("r0", ReplicaState.READY)
    await asyncio.wait_for(waiter, 5)
    assert q.depth("m") == 0


async def test_the_cold_start_queue_gives_up_with_503_and_is_bounded() -> None:
    registry, clock = ReplicaRegistry(), ManualClock()
    q = ColdStartQueue(registry, clock, frozenset({"m"}), max_wait_s=0.05, max_queued=1)
    with pytest.raises(NoReplicaAvailableError) as info:
        await q.wait_for_replica("other")  # not managed: at once
    assert info.value.status == 503
    outcomes: list[bool] = []
    q.on_done.append(lambda _m, _s, served: outcomes.append(served))
    first = asyncio.create_task(q.wait_for_replica("m"))
    while q.depth("m") == 0:
        await asyncio.sleep(0)
    with pytest.raises(NoReplicaAvailableError, match="already wait"):
        await q.wait_for_replica("m")
    clock.advance(1)  # past max_wait_s: the next change (or timeout) ends the wait
    registry.add(_replica("r0"))
    with pytest.raises(NoReplicaAvailableError, match="became ready within") as info:
        await asyncio.wait_for(first, 5)
    assert info.value.headers["Retry-After"].isdigit() and outcomes == [False]


class OrdinalProvider(CapacityProvider):
    """A StatefulSet-like provider: scale-down removes the highest ordinals."""

    ordered_scale_down = True

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        return [ReplicaInfo(id=f"{pool.split('/')[1]}-{i}", pool=pool, state=ReplicaState.READY, ordinal=i)
                for i in range(self.sizes.get(pool, 0))]


async def test_drains_are_remapped_to_the_ordinals_a_statefulset_removes(store: Store) -> None:
    clock, provider = ManualClock(wall_offset=WALL0), OrdinalProvider()
    c = make(store, provider, clock)
    await c.start()
    await c.scale("m", "spot", 3)
    gen = [0.0]
    await run(c, clock, 1, gen, tps=0, waiting=0)
    assert provider.sizes["m/spot"] == 3
    await c.scale("m", "spot", 1)  # the policy names the least loaded; the StatefulSet removes spot-2, spot-1
    await run(c, clock, 1, gen, tps=0, waiting=0)
    assert sorted(provider.drained) == ["spot-1", "spot-2"] and provider.sizes["m/spot"] == 1
