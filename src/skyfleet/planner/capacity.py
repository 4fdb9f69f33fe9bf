"""What one replica can serve at an SLO: a steady-state capacity model of the simulator's replica.

The planner (:mod:`skyfleet.planner.milp`) sizes fleets with these numbers, and the fleet spec it writes
carries them as each pool's ``tokens_per_s``. The model is the simulator's timing model
(:mod:`skyfleet.engines.sim.model`), read in steady state, plus a term for prefill stealing GPU time
from decode, which the simulator leaves out and real engines do not.

The model
---------

A replica runs up to ``B`` requests at once (its batch). With ``P = mean_prompt / prefill_tokens_per_s``
(one request's prefill time), ``tpot(B) = tpot_base_s * (1 + tpot_batch_slope * (B - 1))`` (the
simulator's decode step) and an arrival rate ``lambda`` per replica:

* **Prefill interference.** Prefill and decode share the GPU: while the replica prefills, its decode
  steps stall. A fraction ``rho = lambda * w * P`` of the time goes to prefill (``w``:
  ``prefill_interference``, 1 by default; 0 is the simulator, where prefills are free for the others).
  Decode then runs at ``tpot_eff = tpot(B) / (1 - rho)``, and a new request waits, on average,
  ``w * P * rho / (1 - rho)`` behind the other prefills (the mean wait of an M/M/1 queue of prefills).
* **Time to first token** (no admission queueing): ``ttft = ttft_base_s + P95 + w * P * rho / (1 - rho)``,
  ``P95`` being the prefill time of the 95th-percentile prompt (``p95_prompt_tokens``; the mean if not
  given), since the SLO is on the 95th percentile.
* **Little's law.** Each request holds a batch slot for
  ``T = ttft_base_s + P + w * P * rho / (1 - rho) + mean_output * tpot(B) / (1 - rho)``, so a batch of
  ``B`` is full at ``lambda(B) = B / T``. ``lambda`` appears on both sides; multiplied out it is a
  quadratic whose smaller root is the answer (it always exists and keeps ``rho < 1``): nothing iterates.
  ``mean_output * tpot`` (not ``mean_output - 1``) is slightly conservative against the simulator.
* **The rate.** For each batch ``B`` allowed by ``max_num_seqs`` and the KV cache
  (``kv_capacity_tokens // (mean_prompt + mean_output)``: the simulator reserves prompt + output tokens per
  running request) the replica can take ``r(B) = min(lambda(B), r_tpot(B), r_ttft)``: at most what a batch
  of ``B`` sustains, at most the rate whose prefill share keeps ``tpot_eff`` within the TPOT SLO
  (``(1 - tpot(B) / slo) / (w P)``), at most the rate whose prefill wait keeps TTFT within its SLO. Running
  below ``lambda(B)`` only lowers the occupancy, so every constraint still holds. The capacity is the best
  ``r(B)``; ``max_batch`` is the smallest batch reaching it. Without interference (``w = 0``) the last two
  bounds are infinite and this is exactly "the largest batch with ``tpot(B)`` within the SLO, at Little's
  law rate". Each bound is monotone in every speed and SLO parameter, so the capacity is too (tested).
  Batches above :data:`MAX_BATCH_SCANNED` are not considered.

The approximation is conservative on purpose: the TPOT SLO is checked at the *mean* batch (the p95 batch is
larger; the planner sizes for the peak minute and a headroom factor on top), and the interference term
makes a replica slower than the simulator's, which runs prefills beside decode for free. With
``prefill_interference=0`` the model agrees with the simulator up to the ``mean_output`` vs
``mean_output - 1`` tokens of decode (tested against :class:`~skyfleet.engines.sim.model.SimModel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from skyfleet.fleet.spec import Slo
from skyfleet.planner.types import EngineProfile

__all__ = ["MAX_BATCH_SCANNED", "ReplicaCapacity", "replica_capacity"]

#: largest batch size the model considers (profiles with huge ``max_num_seqs`` and no batch slope)
MAX_BATCH_SCANNED = 1 << 17


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    """One replica's sustainable load at an SLO (see the module docstring for the model).

    ``max_batch``: the smallest batch at which the replica reaches ``requests_per_s`` (without prefill
    interference, the largest batch whose ``tpot`` meets the SLO); ``ttft_s`` / ``tpot_s``: the latencies at
    that load. ``meets_slo`` False: ``max_batch`` and the rates are 0, ``ttft_s`` / ``tpot_s`` are the best
    the replica achieves (with no load at all), and ``why`` says which bound fails.
    """

    meets_slo: bool
    max_batch: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: float
    tpot_s: float
    why: str
    #: prompt tokens/s at that load (``requests_per_s * mean_prompt``); None: not constrained
    prompt_tokens_per_s: float | None = None
    #: what bounds ``max_batch`` when the SLO is met: "TPOT SLO", "TTFT SLO", "KV cache", "max_num_seqs"
    limit: str = ""


def replica_capacity(profile: EngineProfile, slo: Slo, *, mean_prompt_tokens: float, mean_output_tokens: float,
                     p95_prompt_tokens: float | None = None, prefill_interference: float = 1.0) \
        -> ReplicaCapacity:
    """The largest load one replica of ``profile`` serves within ``slo``, for requests of these sizes."""
    _check("mean_prompt_tokens", mean_prompt_tokens, lo=0.0)
    _check("mean_output_tokens", mean_output_tokens, lo=0.0)
    if p95_prompt_tokens is not None:
        _check("p95_prompt_tokens", p95_prompt_tokens, lo=0.0)
    if not 0.0 <= prefill_interference <= 1.0:
        raise ValueError(f"prefill_interference must be in [0, 1], not {prefill_interference!r}")
    prefill = profile.prefill_tokens_per_s
    p_mean = mean_prompt_tokens / prefill
    p_95 = (p95_prompt_tokens if p95_prompt_tokens is not None else mean_prompt_tokens) / prefill
    p_w = prefill_interference * p_mean
    tb = profile.ttft_base_s

    per_request_kv = mean_prompt_tokens + mean_output_tokens
    kv_batches = (int(profile.kv_capacity_tokens // per_request_kv) if per_request_kv > 0
                  else MAX_BATCH_SCANNED)
    cap = min(profile.max_num_seqs, kv_batches, MAX_BATCH_SCANNED)
    if cap < 1:
        return _fails(tb + p_95, profile.tpot_base_s,
                      f"KV cache ({profile.kv_capacity_tokens} tokens) cannot hold one mean request "
                      f"({per_request_kv:.0f} tokens)")

    best_ttft = tb + p_95
    ttft_slack = slo.ttft_p95_s - best_ttft
    reasons = []
    if ttft_slack < 0:
        reasons.append(f"TTFT {best_ttft:.3g} s at best > SLO {slo.ttft_p95_s:g} s")
    if profile.tpot_base_s > slo.tpot_p95_s or (p_w > 0 and profile.tpot_base_s >= slo.tpot_p95_s):
        reasons.append(f"TPOT {profile.tpot_base_s:.3g} s at best > SLO {slo.tpot_p95_s:g} s")
    if reasons:
        return _fails(best_ttft, profile.tpot_base_s, "; ".join(reasons))

    batch = np.arange(1, cap + 1, dtype=np.float64)
    tpot = profile.tpot_base_s * (1.0 + profile.tpot_batch_slope * (batch - 1.0))
    decode = mean_output_tokens * tpot
    # lambda * T(lambda) = B  <=>  A lambda^2 - b lambda + B = 0 (see the module docstring)
    a = p_w * (tb + p_mean - p_w)
    b = tb + p_mean + decode + batch * p_w
    disc = np.maximum(b * b - 4.0 * a * batch, 0.0)
    if not b[0] > 0:
        raise ValueError("the profile serves a request in no time at all (no TTFT, prefill or decode "
                         "time): its capacity is unbounded")
    full = 2.0 * batch / (b + np.sqrt(disc))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if p_w > 0:
            by_tpot = np.where(tpot <= slo.tpot_p95_s, (1.0 - tpot / slo.tpot_p95_s) / p_w, 0.0)
            by_ttft = ttft_slack / (p_w * (p_w + ttft_slack)) if ttft_slack > 0 else 0.0
        else:
            by_tpot = np.where(tpot <= slo.tpot_p95_s, np.inf, 0.0)
            by_ttft = math.inf
    rate = np.minimum(np.minimum(full, by_tpot), by_ttft)
    top = float(rate.max())
    if not top > 0:
        return _fails(best_ttft, profile.tpot_base_s,
                      f"no load meets the SLO (TTFT {best_ttft:.3g} s, TPOT {profile.tpot_base_s:.3g} s at best)")
    best = int(np.flatnonzero(rate >= top * (1.0 - 1e-12))[0])
    n = best + 1
    if top >= by_ttft * (1.0 - 1e-12):
        limit = "TTFT SLO"
    elif top >= by_tpot[best] * (1.0 - 1e-12) or n < cap:
        limit = "TPOT SLO"
    elif cap == MAX_BATCH_SCANNED and cap < min(profile.max_num_seqs, kv_batches):
        limit = "batch scan limit"
    else:
        limit = "max_num_seqs" if profile.max_num_seqs <= kv_batches else "KV cache"
    rho = top * p_w
    return ReplicaCapacity(
        meets_slo=True, max_batch=n, requests_per_s=top, output_tokens_per_s=top * mean_output_tokens,
        ttft_s=tb + p_95 + p_w * rho / (1.0 - rho), tpot_s=float(tpot[best]) / (1.0 - rho), why="",
        prompt_tokens_per_s=top * mean_prompt_tokens, limit=limit,
    )


def _fails(ttft: float, tpot: float, why: str) -> ReplicaCapacity:
    return ReplicaCapacity(meets_slo=False, max_batch=0, requests_per_s=0.0, output_tokens_per_s=0.0,
                           ttft_s=ttft, tpot_s=tpot, why=why, prompt_tokens_per_s=0.0)


def _check(name: str, value: float, *, lo: float) -> None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if math.isnan(x) or math.isinf(x) or x < lo:
        raise ValueError(f"{name} must be a finite number >= {lo:g}, not {value!r}")
