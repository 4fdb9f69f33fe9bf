"""The llama.cpp slot table: pinning, waiting for a free slot, no lost wake-ups."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.clock import ManualClock
from skyfleet.engines.kvstate import LlamaSlots, slot_file
from skyfleet.fleet.replica import ReplicaSpec
from skyfleet.gateway.upstream import UpstreamClient

SPEC = ReplicaSpec(id="r0", base_url="http://127.0.0.1:9", model="m", engine="llama", upstream_model="m")


def _slots(tmp: Path, n: int = 2) -> LlamaSlots:
    # Same-tenant anonymous requests never need a slot action, so the client is never used.
    upstream = UpstreamClient(connect_timeout_s=1, request_timeout_s=1, pool_size=1)
    return LlamaSlots(upstream, tmp, ManualClock(), slots_per_replica=n)


@settings(max_examples=30, deadline=None)
@given(n_slots=st.integers(1, 3), n_requests=st.integers(1, 12), hold=st.lists(st.integers(0, 3), min_size=12,
                                                                                max_size=12))
def test_never_more_holders_than_slots_and_everyone_gets_one(tmp_path_factory, n_slots, n_requests, hold) -> None:
    kv = _slots(tmp_path_factory.mktemp("kv"), n_slots)
    holding: set[int] = set()
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        lease = await kv.acquire(SPEC, "tenant", None)
        slot = lease.fields["id_slot"]
        assert slot not in holding  # no two requests on one slot at once
        holding.add(slot)
        peak = max(peak, len(holding))
        for _ in range(hold[i]):
            await asyncio.sleep(0)
        holding.discard(slot)
        lease.release(True)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n_requests))), timeout=5)

    asyncio.run(run())
    assert peak <= n_slots
    assert kv.stats["pinned"] == n_requests


async def test_session_returns_to_its_slot(tmp_path: Path) -> None:
    kv = _slots(tmp_path)
    first = await kv.acquire(SPEC, "t", None)
    first.release(True)
    # Anonymous requests of the same tenant reuse their own slot (prefix reuse within a tenant).
    again = await kv.acquire(SPEC, "t", None)
    assert again.fields == first.fields
    again.release(True)


def test_slot_file_names_carry_tenant_id_but_not_the_session() -> None:
    name = slot_file("ten_abc", "my secret session")
    assert name.startswith("ten_abc-") and name.endswith(".bin")
    assert "secret" not in name
    assert slot_file("ten_abc", "s") != slot_file("ten_xyz", "s")
