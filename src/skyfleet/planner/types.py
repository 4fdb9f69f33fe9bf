"""The values the planner's parts exchange: a request trace and an engine performance profile.

Both are frozen. A :class:`Trace` holds its columns as numpy arrays (one row per request, sorted by
arrival), so that a whole day of traffic costs a few arrays, not a million objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from skyfleet.engines.sim.profile import SimProfile

__all__ = ["EngineProfile", "Trace"]


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests to replay, sorted by arrival.

    ``arrival_s``: seconds since the trace's start (float64, non-decreasing, first >= 0).
    ``prompt_tokens`` / ``output_tokens``: int64, >= 0 (prompt) and >= 1 (output).
    ``hash_ids``: per request, its prompt's prefix-block hashes (Mooncake), or None where unknown;
    ``block_tokens`` the tokens per block they were computed with.
    ``session``: per request, a conversation key (None: no session), for routing affinity.
    ``tenant``: per request, a tenant name (None: one anonymous tenant).
    ``start_epoch``: wall-clock epoch seconds of ``arrival_s == 0`` when the source says (schedules
    need it), else None.
    """

    name: str
    arrival_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    hash_ids: tuple[tuple[int, ...], ...] | None = None
    block_tokens: int | None = None
    session: tuple[str | None, ...] | None = None
    tenant: tuple[str | None, ...] | None = None
    start_epoch: float | None = None
    meta: dict[str, str] = field(default_factory=dict)  # source file, slice and scale applied

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """How one replica of ``model`` on ``engine`` performs on an instance with ``gpu`` x ``gpus``.

    The timing fields mean what they mean in :class:`~skyfleet.engines.sim.profile.SimProfile` (the
    simulator runs each replica as a :class:`~skyfleet.engines.sim.model.SimModel`):
    ``ttft_s = ttft_base_s + uncached_prompt_tokens / prefill_tokens_per_s`` once admitted, and
    ``tpot(B) = tpot_base_s * (1 + tpot_batch_slope * (B - 1))`` with ``B`` requests running.
    ``source``: where the numbers come from (a citation, or ``measured: <endpoint> <date>``).
    """

    gpu: str  # accelerator as named in the instance catalog: T4, L4, A10G, L40S, A100, A100-80GB, H100
    gpus: int  # accelerators per replica (tensor parallel)
    model: str  # e.g. llama-3.1-8b
    engine: str  # vllm, sglang, llama
    prefill_tokens_per_s: float
    ttft_base_s: float
    tpot_base_s: float
    tpot_batch_slope: float
    kv_capacity_tokens: int
    max_num_seqs: int
    cold_start_s: float  # from instance request to READY (boot + image + weights + engine start)
    source: str
    max_model_len: int = 32_768

    def sim_profile(self) -> SimProfile:
        return SimProfile(
            ttft_base_s=self.ttft_base_s, prefill_tokens_per_s=self.prefill_tokens_per_s,
            tpot_base_s=self.tpot_base_s, tpot_batch_slope=self.tpot_batch_slope,
            kv_capacity_tokens=self.kv_capacity_tokens, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
        )
