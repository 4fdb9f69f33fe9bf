"""The fleet controller's records on real SQLite and PostgreSQL: policy state saved and loaded, decisions
appended with their inputs and listed newest first, one transaction for both."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from skyfleet.fleet.policy.base import Decision, PolicyState
from skyfleet.state import Store
from skyfleet.state.fleet import FleetRepository, numbers_only

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def test_state_is_saved_replaced_and_loaded(store: Store) -> None:
    repo = FleetRepository(store.engine)
    assert await repo.load_state("m") is None
    first = PolicyState(desired={"spot": 2, "od": 1}, history=((1.5, 3),), last_change_at=1.0, last_direction=1)
    await repo.save_state("m", first.to_json(), T0)
    assert PolicyState.from_json(await repo.load_state("m") or {}) == first
    second = PolicyState(desired={"spot": 0, "od": 1}, idle_since=2.25)
    await repo.save_state("m", second.to_json(), T0 + timedelta(seconds=5))
    assert PolicyState.from_json(await repo.load_state("m") or {}) == second
    assert await repo.load_state("other") is None


async def test_decisions_are_recorded_with_the_state_and_listed_newest_first(store: Store) -> None:
    repo = FleetRepository(store.engine)
    ids = []
    for i in range(5):
        d = Decision(desired={"od": i}, drain=("od-9",) if i == 3 else (), reason=f"step {i}", direction=1,
                     inputs={"current": i, "tps": 10.5 * i, "ttft_p95_s": None})
        state = PolicyState(desired=dict(d.desired))
        ids.append(await repo.record("a" if i % 2 == 0 else "b", T0 + timedelta(seconds=i), inputs=d.inputs,
                                     decision=d.to_json(), reason=d.reason, state=state.to_json()))
    assert ids == sorted(ids) and len(set(ids)) == 5
    every = await repo.list_decisions()
    assert [r.reason for r in every] == ["step 4", "step 3", "step 2", "step 1", "step 0"]
    three = every[1]
    assert (three.model, three.at, three.inputs) == ("b", T0 + timedelta(seconds=3),
                                                      {"current": 3, "tps": 31.5, "ttft_p95_s": None})
    assert three.decision == {"desired": {"od": 3}, "drain": ["od-9"], "reason": "step 3", "direction": 1}
    assert [r.reason for r in await repo.list_decisions("a", limit=2)] == ["step 4", "step 2"]
    assert [r.reason for r in await repo.list_decisions("a", before_id=every[0].id)] == ["step 2", "step 0"]
    # The state saved with the last decision of each model.
    assert (await repo.load_state("a") or {})["desired"] == {"od": 4}
    assert (await repo.load_state("b") or {})["desired"] == {"od": 3}
    assert await repo.prune_decisions(T0 + timedelta(seconds=2)) == 2
    assert [r.reason for r in await repo.list_decisions()] == ["step 4", "step 3", "step 2"]


async def test_only_numbers_go_into_the_inputs(store: Store) -> None:
    repo = FleetRepository(store.engine)
    with pytest.raises(ValueError, match="'note' is not a number"):
        await repo.append_decision("m", T0, inputs={"note": "a prompt"}, decision={}, reason="r")
    with pytest.raises(ValueError):
        numbers_only({"flag": True})
    assert numbers_only({"x": float("inf"), "y": 2}) == {"x": None, "y": 2}
    assert await repo.list_decisions() == []  # nothing half-written
    await repo.append_decision("m", T0, inputs={"x": float("nan")}, decision={"desired": {}}, reason="r")
    assert (await repo.list_decisions())[0].inputs == {"x": None}
