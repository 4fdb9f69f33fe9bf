"""Session affinity (consistent hashing with bounded loads): a pure function of its snapshot."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from skyfleet.routing.affinity import (
    HashRing,
    PrefixAffinity,
    SessionAffinity,
    affinity_hash,
    prefix_key,
    prefix_key_from_text,
)
from skyfleet.routing.least_load import LeastOutstandingRequests
from skyfleet.routing.policy import ReplicaLoad, RouteRequest, RoutingSnapshot

policy = SessionAffinity()

ids = st.text("abcdefgh", min_size=1, max_size=4)
loads = st.lists(
    st.builds(
        ReplicaLoad,
        replica_id=ids,
        outstanding=st.integers(0, 50),
        engine_running=st.floats(0, 50),
        engine_waiting=st.integers(0, 20).map(float),
        capacity=st.integers(0, 8),
    ),
    max_size=8,
    unique_by=lambda r: r.replica_id,
)
session_keys = st.one_of(st.none(), st.text(min_size=1, max_size=12))
tenants = st.text(min_size=0, max_size=8)
factors = st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0])


def _snap(replicas, seq: int = 0) -> RoutingSnapshot:
    return RoutingSnapshot(now=0.0, replicas=tuple(replicas), seq=seq)


def _req(key: str | None, tenant: str = "t", exclude: frozenset[str] = frozenset()) -> RouteRequest:
    return RouteRequest(tenant_id=tenant, model="m", session_key=key, exclude=exclude)


def _zero(names) -> tuple[ReplicaLoad, ...]:
    return tuple(ReplicaLoad(replica_id=n, outstanding=0) for n in names)


def _eligible(replicas, exclude, c: float) -> set[str]:
    """Reference rule: load < ceil(c * cap * T / W), T counting this request, exact arithmetic."""
    cands = [r for r in replicas if r.replica_id not in exclude]
    total = sum(Fraction(r.outstanding) + Fraction(r.engine_waiting) for r in cands) + 1
    weight = sum(max(1, r.capacity) for r in cands)
    cf = Fraction(str(c))
    return {
        r.replica_id
        for r in cands
        if r.outstanding + r.engine_waiting < math.ceil(cf * max(1, r.capacity) * total / weight)
    }


# --- the choice itself ---------------------------------------------------------------------


@given(loads, session_keys, tenants, factors, st.integers(0, 1000), st.data())
def test_choice_is_a_candidate_or_none(replicas, key, tenant, c, seq, data) -> None:
    names = [r.replica_id for r in replicas]
    exclude = frozenset(data.draw(st.lists(st.sampled_from(names), unique=True))) if names else frozenset()
    choice = SessionAffinity(c).choose(_snap(replicas, seq), _req(key, tenant, exclude))
    candidates = {r.replica_id for r in replicas} - exclude
    if not candidates:
        assert choice is None
    else:
        assert choice in candidates


@given(loads, st.text(min_size=1, max_size=12), tenants, factors, st.data())
def test_choice_is_the_first_eligible_replica_in_ring_order(replicas, key, tenant, c, data) -> None:
    names = [r.replica_id for r in replicas]
    assume(names)
    exclude = frozenset(data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1)))
    choice = SessionAffinity(c).choose(_snap(replicas), _req(key, tenant, exclude))
    order = HashRing(names).preference(affinity_hash(tenant, key))
    eligible = _eligible(replicas, exclude, c)
    assert eligible, "the bounds sum to at least the total load, so someone is always eligible"
    assert choice == next(rid for rid in order if rid in eligible)


@given(loads, session_keys, tenants, st.integers(0, 1000), st.randoms(use_true_random=False))
def test_deterministic_across_calls_instances_and_replica_order(replicas, key, tenant, seq, rnd) -> None:
    snap = _snap(replicas, seq)
    first = policy.choose(snap, _req(key, tenant))
    assert policy.choose(snap, _req(key, tenant)) == first
    assert SessionAffinity().choose(snap, _req(key, tenant)) == first
    if key:  # keyed placement does not depend on the order the snapshot lists replicas in
        shuffled = list(replicas)
        rnd.shuffle(shuffled)
        assert SessionAffinity().choose(_snap(shuffled, seq), _req(key, tenant)) == first


def test_hashes_are_stable_across_processes() -> None:
    # Pinned values (BLAKE2b, not Python's salted hash()): a change here means every deployed
    # session moves to another replica after an upgrade.
    assert affinity_hash("tenant", "session") == 18141478345954565758
    assert HashRing(["a", "b"], vnodes=2).points[0] == 9724105922080182703
    assert prefix_key([1, 2], 2) == "d713a1fb1925294a056d38ca377d66a1"
    assert affinity_hash("ab", "c") != affinity_hash("a", "bc")
    assert HashRing(["b", "a"]).points == HashRing(frozenset({"a", "b"})).points
    assert prefix_key([1, 2], 1) == prefix_key([1, 99], 1) == prefix_key(["1"], 1)


@given(loads, tenants, st.integers(0, 1000))
def test_without_session_key_falls_back_to_least_outstanding(replicas, tenant, seq) -> None:
    snap = _snap(replicas, seq)
    expected = LeastOutstandingRequests().choose(snap, _req(None, tenant))
    assert policy.choose(snap, _req(None, tenant)) == expected
    assert policy.choose(snap, _req("", tenant)) == expected


# --- bounded load ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 8),
    factors,
    st.lists(st.integers(1, 4), min_size=8, max_size=8),
    st.integers(0, 2**32),
    st.booleans(),
)
def test_bounded_load_while_placing_many_sessions(n, c, caps, seed, hot) -> None:
    """Placing requests one by one (outstanding += 1 after each), no replica ever exceeds
    ceil(c * its capacity share of the total); with unit capacities that is ceil(c * mean)."""
    rnd = random.Random(seed)
    caps = caps[:n]
    out = dict.fromkeys(range(n), 0)
    p = SessionAffinity(c)
    cf = Fraction(str(c))
    weight = sum(caps)
    for m in range(1, 400 + 1):
        # "hot": a handful of sessions send everything, the worst case for plain hashing.
        key = f"s{rnd.randrange(3)}" if hot else f"s{rnd.randrange(10_000)}"
        snap = _snap([ReplicaLoad(f"r{i}", outstanding=out[i], capacity=caps[i]) for i in range(n)])
        choice = p.choose(snap, _req(key))
        out[int(choice[1:])] += 1
        for i in range(n):
            assert out[i] <= math.ceil(cf * caps[i] * m / weight)
        if len(set(caps)) == 1 and caps[0] == 1:
            assert max(out.values()) <= math.ceil(cf * Fraction(m, n))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), factors, st.integers(0, 2**32))
def test_bounded_load_with_departures(n, c, seed) -> None:
    """Requests also finish at random; the replica chosen is always within the bound after placing."""
    rnd = random.Random(seed)
    out = [0] * n
    p = SessionAffinity(c)
    cf = Fraction(str(c))
    for _ in range(300):
        if rnd.random() < 0.4 and any(out):
            out[rnd.choice([i for i in range(n) if out[i]])] -= 1
            continue
        choice = p.choose(
            _snap([ReplicaLoad(f"r{i}", out[i]) for i in range(n)]), _req(f"s{rnd.randrange(5)}")
        )
        i = int(choice[1:])
        out[i] += 1
        assert out[i] <= math.ceil(cf * Fraction(sum(out), n))


def test_a_hot_session_spills_to_its_next_preference_only() -> None:
    names = [f"r{i}" for i in range(4)]
    first, second = HashRing(names).preference(affinity_hash("t", "hot"))[:2]
    busy = tuple(ReplicaLoad(n, outstanding=10 if n == first else 0) for n in names)
    assert policy.choose(_snap(busy), _req("hot")) == second


# --- disruption when membership changes ----------------------------------------------------

fleet = st.lists(ids, min_size=2, max_size=8, unique=True)


@given(fleet, st.data())
def test_removal_moves_only_the_sessions_of_the_removed_replica(names, data) -> None:
    gone = data.draw(st.sampled_from(names))
    before, after = _zero(names), _zero([n for n in names if n != gone])
    for s in range(300):
        old = policy.choose(_snap(before), _req(f"s{s}"))
        new = policy.choose(_snap(after), _req(f"s{s}"))
        if old != gone:
            assert new == old


@settings(max_examples=60)
@given(fleet, factors, st.data())
def test_removal_under_load_moves_only_its_sessions_when_eligibility_is_unchanged(names, c, data) -> None:
    """With arbitrary loads: if removing a replica changes no other replica's eligibility,
    exactly the sessions that were on it move."""
    gone = data.draw(st.sampled_from(names))
    base = data.draw(st.integers(0, 30))
    before = tuple(ReplicaLoad(n, outstanding=base + data.draw(st.integers(0, 3))) for n in names)
    after = tuple(r for r in before if r.replica_id != gone)
    assume(_eligible(after, frozenset(), c) == _eligible(before, frozenset(), c) - {gone})
    p = SessionAffinity(c)
    for s in range(100):
        old = p.choose(_snap(before), _req(f"s{s}"))
        if old != gone:
            assert p.choose(_snap(after), _req(f"s{s}")) == old


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**32))
def test_addition_moves_about_one_in_n_and_only_to_the_new_replica(n, seed) -> None:
    rnd = random.Random(seed)
    names = [f"r{rnd.randrange(10**9)}" for _ in range(n)]
    newcomer = "new-" + str(rnd.randrange(10**9))
    before, after = _zero(names), _zero([*names, newcomer])
    keys = [f"s{rnd.randrange(10**12)}" for _ in range(2000)]
    moved = 0
    for k in keys:
        old, new = policy.choose(_snap(before), _req(k)), policy.choose(_snap(after), _req(k))
        if new != old:
            assert new == newcomer
            moved += 1
    expected = 1 / (n + 1)
    assert 0.4 * expected < moved / len(keys) < 1.8 * expected


def test_keys_spread_evenly_over_replicas() -> None:
    names = [f"replica-{i}" for i in range(8)]
    counts = dict.fromkeys(names, 0)
    for s in range(8000):
        counts[policy.choose(_snap(_zero(names)), _req(f"session-{s}"))] += 1
    assert max(counts.values()) / (8000 / 8) < 1.3
    assert min(counts.values()) / (8000 / 8) > 0.7


# --- tenants ---------------------------------------------------------------------------------


def test_tenants_are_placed_independently() -> None:
    names = [f"r{i}" for i in range(8)]
    snap = _snap(_zero(names))
    differ = sum(
        policy.choose(snap, _req(f"s{s}", "tenant-a")) != policy.choose(snap, _req(f"s{s}", "tenant-b"))
        for s in range(1000)
    )
    # Independent placement differs with probability 7/8.
    assert differ > 0.75 * 1000


@given(st.text(max_size=6), st.text(min_size=1, max_size=6), st.text(min_size=1, max_size=6))
def test_tenant_and_key_do_not_run_together(t1, t2, key) -> None:
    assert affinity_hash(t1, t2 + key) != affinity_hash(t1 + t2, key)


# --- prefix keys -----------------------------------------------------------------------------


def test_prefix_keys() -> None:
    doc = [b"sys", b"doc", b"q1"]
    assert prefix_key(doc, 1) == prefix_key([b"sys", b"other"], 1)
    assert prefix_key(doc, 1, skip_blocks=1) == prefix_key([b"sys", b"doc", b"q2"], 1, skip_blocks=1)
    assert prefix_key(doc, 1, skip_blocks=1) != prefix_key([b"sys", b"doc2"], 1, skip_blocks=1)
    assert prefix_key(doc, 2) != prefix_key([b"sys", b"doc", b"q1"], 3)
    assert prefix_key([b"sys"], 1, skip_blocks=1) is None
    assert prefix_key([b"ab", b"c"], 2) != prefix_key([b"a", b"bc"], 2)
    text = "s" * 5000
    assert prefix_key_from_text(text + "turn 1") == prefix_key_from_text(text + "turn 2")
    assert prefix_key_from_text("", 1) is None
    assert prefix_key_from_text("abc", skip_chars=3) is None
    with pytest.raises(ValueError):
        prefix_key(doc, 0)


def test_prefix_affinity_routes_a_shared_prefix_together() -> None:
    p = PrefixAffinity(prefix_blocks=1, skip_blocks=1)
    snap = _snap(_zero([f"r{i}" for i in range(8)]))
    turns = [[0, 7, 8], [0, 7, 8, 9, 10], [0, 7, 8, 9, 10, 11]]
    chosen = {p.choose(snap, _req(p.key_for_blocks(t))) for t in turns}
    assert len(chosen) == 1
    assert p.key_for_blocks([0]) is None  # only the shared prefix: least-outstanding
    assert p.key_for_text("x" * 4096 + "a") == p.key_for_text("x" * 4096 + "b")


def test_invalid_parameters() -> None:
    for bad in (0.99, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            SessionAffinity(bad)
    with pytest.raises(ValueError):
        SessionAffinity(vnodes=0)
    with pytest.raises(ValueError):
        PrefixAffinity(prefix_blocks=0)
