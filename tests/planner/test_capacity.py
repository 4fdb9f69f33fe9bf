"""The replica capacity model: hand-computed golden values, agreement with the simulator's replica
(SimModel, driven closed-loop on a ManualClock), infeasible SLOs explained, and properties (bounds never
exceeded, monotone in speed, SLO, KV cache and interference)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.clock import ManualClock
from skyfleet.engines.sim.model import SimModel
from skyfleet.fleet.spec import Slo
from skyfleet.planner.capacity import ReplicaCapacity, replica_capacity
from skyfleet.planner.types import EngineProfile


def profile(**kw: float) -> EngineProfile:
    base = dict(gpu="L4", gpus=1, model="m", engine="vllm", prefill_tokens_per_s=1000.0, ttft_base_s=0.1,
                tpot_base_s=0.01, tpot_batch_slope=0.1, kv_capacity_tokens=1_000_000, max_num_seqs=64,
                cold_start_s=60.0, source="test")
    base.update(kw)
    return EngineProfile(**base)  # type: ignore[arg-type]


SLO = Slo(ttft_p95_s=1.0, tpot_p95_s=0.02)


def cap(p: EngineProfile, slo: Slo = SLO, *, prompt: float = 100, output: float = 100, p95: float | None = None,
        w: float = 1.0) -> ReplicaCapacity:
    return replica_capacity(p, slo, mean_prompt_tokens=prompt, mean_output_tokens=output, p95_prompt_tokens=p95,
                            prefill_interference=w)


def test_without_interference_it_is_the_largest_batch_within_tpot_at_littles_law_rate() -> None:
    # tpot(B) = 0.01 (1 + 0.1 (B - 1)) <= 0.02  <=>  B <= 11; T = 0.1 + 100/1000 + 100 * 0.02 = 2.2 s
    c = cap(profile(), w=0.0)
    assert c.meets_slo and c.max_batch == 11 and c.limit == "TPOT SLO" and c.why == ""
    assert c.requests_per_s == pytest.approx(11 / 2.2)
    assert c.output_tokens_per_s == pytest.approx(500.0) and c.prompt_tokens_per_s == pytest.approx(500.0)
    assert (c.ttft_s, c.tpot_s) == (pytest.approx(0.2), pytest.approx(0.02))


def test_prefill_interference_golden() -> None:
    # P = 0.1 s. The TPOT bound: tpot(B) / (1 - 0.1 r) <= 0.02  ->  r <= 5.5 - 0.5 B; a batch of 6 sustains
    # lambda(6) = 2.64 > 2.5 = the bound, a batch of 7 only 2.0 by TPOT: 2.5 req/s at B = 6, rho = 0.25.
    c = cap(profile(), w=1.0)
    assert c.meets_slo and c.max_batch == 6 and c.limit == "TPOT SLO"
    assert c.requests_per_s == pytest.approx(2.5)
    assert c.tpot_s == pytest.approx(0.015 / 0.75)
    assert c.ttft_s == pytest.approx(0.2 + 0.1 * 0.25 / 0.75)
    # Little's law holds for what the batch of 6 would carry at full occupancy: lambda(6) T(lambda(6)) = 6.
    lam = 12 / (2.3 + math.sqrt(2.3**2 - 4 * 0.01 * 6))
    rho = 0.1 * lam
    assert lam * (0.1 + 0.1 + 0.1 * rho / (1 - rho) + 100 * 0.015 / (1 - rho)) == pytest.approx(6)
    assert lam > c.requests_per_s


def test_a_tight_ttft_caps_the_rate_through_the_prefill_wait() -> None:
    # TTFT = 0.2 + 0.1 rho / (1 - rho) <= 0.25  ->  rho <= 1/3  ->  r <= 3.33; with a looser TPOT SLO
    c = cap(profile(), Slo(ttft_p95_s=0.25, tpot_p95_s=0.05))
    assert c.meets_slo and c.limit == "TTFT SLO"
    assert c.requests_per_s == pytest.approx(10 / 3) and c.ttft_s == pytest.approx(0.25)


def test_kv_cache_and_max_num_seqs_bound_the_batch() -> None:
    c = cap(profile(kv_capacity_tokens=1000, tpot_batch_slope=0.0), w=0.0)  # 1000 // 200 = 5 requests fit
    assert c.max_batch == 5 and c.limit == "KV cache" and c.requests_per_s == pytest.approx(5 / 1.2)
    c = cap(profile(max_num_seqs=3, tpot_batch_slope=0.0), w=0.0)
    assert c.max_batch == 3 and c.limit == "max_num_seqs"


@pytest.mark.parametrize(("kw", "slo", "message"), [
    ({"ttft_base_s": 2.0}, SLO, "TTFT 2.1 s at best > SLO 1 s"),
    ({"tpot_base_s": 0.05}, SLO, "TPOT 0.05 s at best > SLO 0.02 s"),
    ({"ttft_base_s": 2.0, "tpot_base_s": 0.05}, SLO, "TTFT 2.1 s at best > SLO 1 s; TPOT 0.05 s at best"),
    ({"kv_capacity_tokens": 150}, SLO, "KV cache (150 tokens) cannot hold one mean request (200 tokens)"),
])
def test_an_slo_it_cannot_meet_says_which_bound_fails_and_the_best_value(kw: dict[str, float], slo: Slo,
                                                                          message: str) -> None:
    c = cap(profile(**kw), slo)
    assert not c.meets_slo and message in c.why
    assert (c.max_batch, c.requests_per_s, c.output_tokens_per_s) == (0, 0.0, 0.0)


def test_the_ttft_slo_is_checked_with_the_p95_prompt() -> None:
    assert cap(profile(), p95=800).meets_slo  # 0.1 + 0.8 s
    c = cap(profile(), p95=1000)
    assert not c.meets_slo and "TTFT 1.1 s at best" in c.why


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="mean_prompt_tokens"):
        cap(profile(), prompt=-1)
    with pytest.raises(ValueError, match="mean_output_tokens"):
        cap(profile(), output=math.nan)
    with pytest.raises(ValueError, match="prefill_interference"):
        cap(profile(), w=2.0)


def closed_loop_rate(p: EngineProfile, batch: int, prompt_tokens: int, output_tokens: int, cycles: int) -> float:
    """Completions per second of a simulated replica kept at exactly ``batch`` requests in flight."""
    clock = ManualClock()
    model = SimModel(p.sim_profile(), clock)
    k = 0

    def submit() -> object:
        nonlocal k
        k += 1  # a unique first block: no prefix-cache hits
        return model.submit(f"{k:012d}".ljust(4 * prompt_tokens, "x"), max_tokens=output_tokens)

    running = [submit() for _ in range(batch)]
    done, warm_at, warm_done = 0, None, 0
    while done < (cycles + 1) * batch:
        due = min(model.next_update_at(r, each_token=False) for r in running)  # type: ignore[attr-defined]
        clock.advance(max(due - clock.now(), 0.0))
        model.advance()
        for i, r in enumerate(running):
            if r.done:  # type: ignore[attr-defined]
                done += 1
                running[i] = submit()
        if warm_at is None and done >= batch:
            warm_at, warm_done = clock.now(), done
    assert warm_at is not None
    return (done - warm_done) / (clock.now() - warm_at)


@pytest.mark.parametrize(("prompt", "output"), [(200, 50), (1000, 200)])
def test_without_interference_it_agrees_with_the_simulated_replica(prompt: int, output: int) -> None:
    p = profile(ttft_base_s=0.05, prefill_tokens_per_s=4000.0, tpot_base_s=0.01, tpot_batch_slope=0.05,
                kv_capacity_tokens=400_000, max_num_seqs=256)
    c = cap(p, Slo(ttft_p95_s=2.0, tpot_p95_s=0.0301), prompt=prompt, output=output, w=0.0)
    assert c.meets_slo and c.max_batch == 41  # 1 + 0.05 (B - 1) <= 3
    measured = closed_loop_rate(p, c.max_batch, prompt, output, cycles=5)
    # The model charges mean_output decode steps, the simulator mean_output - 1 (the first token comes with
    # the prefill): the model is a little conservative, never optimistic.
    exact = c.max_batch / (p.ttft_base_s + prompt / p.prefill_tokens_per_s + (output - 1) * c.tpot_s)
    assert measured == pytest.approx(exact, rel=1e-3)
    assert c.requests_per_s <= measured and c.requests_per_s == pytest.approx(measured, rel=0.03)
    # with interference the replica is slower than the simulator's, never faster
    assert cap(p, Slo(ttft_p95_s=2.0, tpot_p95_s=0.0301), prompt=prompt, output=output).requests_per_s < measured


# -- properties ------------------------------------------------------------------------------------------------

profiles = st.builds(
    profile,
    prefill_tokens_per_s=st.floats(200, 50_000), ttft_base_s=st.floats(0, 0.5), tpot_base_s=st.floats(0.002, 0.1),
    tpot_batch_slope=st.floats(0, 0.3), kv_capacity_tokens=st.integers(500, 2_000_000),
    max_num_seqs=st.integers(1, 512))
slos = st.builds(Slo, ttft_p95_s=st.floats(0.05, 5), tpot_p95_s=st.floats(0.005, 0.2))
loads = st.tuples(st.floats(0, 4000), st.floats(1, 1000), st.floats(1, 3))  # prompt, output, p95 / mean
weights = st.sampled_from([0.0, 0.5, 1.0])


def run(p: EngineProfile, slo: Slo, load: tuple[float, float, float], w: float) -> ReplicaCapacity:
    prompt, output, p95 = load
    return cap(p, slo, prompt=prompt, output=output, p95=prompt * p95, w=w)


@settings(max_examples=300, deadline=None)
@given(profiles, slos, loads, weights)
def test_the_capacity_respects_every_bound(p: EngineProfile, slo: Slo, load: tuple[float, float, float],
                                           w: float) -> None:
    prompt, output, _ = load
    c = run(p, slo, load, w)
    assert c.max_batch <= p.max_num_seqs and c.max_batch <= p.kv_capacity_tokens // (prompt + output)
    if not c.meets_slo:
        assert c.why and c.requests_per_s == 0 == c.max_batch
        return
    assert c.ttft_s <= slo.ttft_p95_s * (1 + 1e-9) and c.tpot_s <= slo.tpot_p95_s * (1 + 1e-9)
    assert c.requests_per_s > 0 and c.output_tokens_per_s == pytest.approx(c.requests_per_s * output)
    tpot = p.tpot_base_s * (1 + p.tpot_batch_slope * (c.max_batch - 1))
    little = c.max_batch / (p.ttft_base_s + prompt / p.prefill_tokens_per_s + output * tpot)
    assert c.requests_per_s <= little * (1 + 1e-9)  # never more than the batch carries without interference
    if w == 0:  # the plain definition: the largest batch whose tpot meets the SLO
        assert tpot <= slo.tpot_p95_s * (1 + 1e-12)
        cap_b = min(p.max_num_seqs, p.kv_capacity_tokens // (prompt + output))
        nxt = p.tpot_base_s * (1 + p.tpot_batch_slope * c.max_batch)
        assert c.max_batch == cap_b or nxt > slo.tpot_p95_s or p.tpot_batch_slope == 0


@settings(max_examples=300, deadline=None)
@given(profiles, slos, loads, weights, st.floats(1, 4))
def test_a_faster_profile_never_serves_less(p: EngineProfile, slo: Slo, load: tuple[float, float, float],
                                            w: float, speed: float) -> None:
    slow = run(p, slo, load, w)
    for fast_p in (
        dataclasses.replace(p, prefill_tokens_per_s=p.prefill_tokens_per_s * speed),
        dataclasses.replace(p, tpot_base_s=p.tpot_base_s / speed),
        dataclasses.replace(p, ttft_base_s=p.ttft_base_s / speed),
        dataclasses.replace(p, tpot_batch_slope=p.tpot_batch_slope / speed),
        dataclasses.replace(p, kv_capacity_tokens=int(p.kv_capacity_tokens * speed),
                            max_num_seqs=int(p.max_num_seqs * speed)),
    ):
        fast = run(fast_p, slo, load, w)
        assert fast.meets_slo or not slow.meets_slo
        assert fast.requests_per_s >= slow.requests_per_s * (1 - 1e-9)


@settings(max_examples=300, deadline=None)
@given(profiles, slos, loads, weights, st.floats(1, 4), st.floats(1, 4))
def test_a_looser_slo_never_serves_less(p: EngineProfile, slo: Slo, load: tuple[float, float, float], w: float,
                                        ttft_x: float, tpot_x: float) -> None:
    tight = run(p, slo, load, w)
    loose = run(p, Slo(ttft_p95_s=slo.ttft_p95_s * ttft_x, tpot_p95_s=slo.tpot_p95_s * tpot_x), load, w)
    assert loose.meets_slo or not tight.meets_slo
    assert loose.requests_per_s >= tight.requests_per_s * (1 - 1e-9)


@settings(max_examples=200, deadline=None)
@given(profiles, slos, loads)
def test_prefill_interference_only_ever_costs_capacity(p: EngineProfile, slo: Slo,
                                                       load: tuple[float, float, float]) -> None:
    rates = [run(p, slo, load, w).requests_per_s for w in (0.0, 0.5, 1.0)]
    assert rates[0] >= rates[1] * (1 - 1e-9) and rates[1] >= rates[2] * (1 - 1e-9)
