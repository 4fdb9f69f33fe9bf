"""The least-outstanding-requests policy: a pure function of its snapshot."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from skyfleet.routing import LeastOutstandingRequests, ReplicaLoad, RouteRequest, RoutingSnapshot

policy = LeastOutstandingRequests()

loads = st.lists(
    st.builds(
        ReplicaLoad,
        replica_id=st.text("abcdef", min_size=1, max_size=4),
        outstanding=st.integers(0, 50),
        engine_running=st.floats(0, 50),
        engine_waiting=st.integers(0, 20).map(float),
        capacity=st.integers(1, 8),
    ),
    max_size=8,
    unique_by=lambda r: r.replica_id,
)


def _req(exclude: frozenset[str] = frozenset()) -> RouteRequest:
    return RouteRequest(tenant_id="t", model="m", exclude=exclude)


@given(loads, st.integers(0, 1000), st.data())
def test_choice_is_a_least_loaded_candidate_not_excluded(replicas, seq, data) -> None:
    ids = [r.replica_id for r in replicas]
    exclude = frozenset(data.draw(st.lists(st.sampled_from(ids), unique=True))) if ids else frozenset()
    choice = policy.choose(RoutingSnapshot(now=0.0, replicas=tuple(replicas), seq=seq), _req(exclude))
    candidates = [r for r in replicas if r.replica_id not in exclude]
    if not candidates:
        assert choice is None
        return
    assert choice in {r.replica_id for r in candidates}
    per_cap = {r.replica_id: (r.outstanding + r.engine_waiting) / r.capacity for r in candidates}
    assert per_cap[choice] == min(per_cap.values())


@given(loads, st.integers(0, 1000))
def test_pure_same_snapshot_same_choice(replicas, seq) -> None:
    snap = RoutingSnapshot(now=1.0, replicas=tuple(replicas), seq=seq)
    assert policy.choose(snap, _req()) == policy.choose(snap, _req())


def test_ties_rotate_with_seq() -> None:
    reps = tuple(ReplicaLoad(replica_id=i, outstanding=0) for i in ("a", "b", "c"))
    chosen = [policy.choose(RoutingSnapshot(now=0, replicas=reps, seq=s), _req()) for s in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_capacity_weighting() -> None:
    reps = (ReplicaLoad("small", outstanding=1, capacity=1), ReplicaLoad("big", outstanding=3, capacity=4))
    assert policy.choose(RoutingSnapshot(now=0, replicas=reps), _req()) == "big"


def test_round_robin_cycles_over_sorted_candidates_and_honours_exclude() -> None:
    from skyfleet.routing import RoundRobin

    reps = tuple(ReplicaLoad(replica_id=i, outstanding=9 if i == "b" else 0) for i in ("c", "a", "b"))
    rr = RoundRobin()
    assert [rr.choose(RoutingSnapshot(now=0, replicas=reps, seq=s), _req()) for s in range(4)] == ["a", "b", "c", "a"]
    assert rr.choose(RoutingSnapshot(now=0, replicas=reps, seq=1), _req(frozenset({"a", "b", "c"}))) is None


def test_make_policy() -> None:
    from skyfleet.routing import RoundRobin, SessionAffinity, make_policy

    assert isinstance(make_policy("affinity", 1.25), SessionAffinity)
    assert isinstance(make_policy("least-load", 1.25), LeastOutstandingRequests)
    assert isinstance(make_policy("round-robin", 1.25), RoundRobin)
