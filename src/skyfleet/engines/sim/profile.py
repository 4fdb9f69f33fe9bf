"""The timing and capacity profile of one simulated replica.

A :class:`SimProfile` is a frozen value: the numbers the timing model in
:mod:`skyfleet.engines.sim.model` needs, and nothing else. Build one in code, with one
of the presets (:meth:`SimProfile.fast`, :meth:`SimProfile.paced`), or load it from a
small YAML or JSON file whose keys are the field names::

    # a small GPU serving a 7B model, roughly
    ttft_base_s: 0.03
    prefill_tokens_per_s: 6000
    tpot_base_s: 0.02
    tpot_batch_slope: 0.03
    kv_capacity_tokens: 65536

Unknown keys are an error (a typo should not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml


class ProfileError(ValueError):
    """A profile file or value that does not describe a valid replica."""


@dataclass(frozen=True, slots=True)
class SimProfile:
    """How fast, and how big, one simulated replica is. Times are in seconds.

    See :mod:`skyfleet.engines.sim.model` for how the fields combine.
    """

    #: fixed part of the time to first token, paid by every request once admitted
    ttft_base_s: float = 0.02
    #: prompt tokens prefilled per second; prefix-cache hits are free; ``inf`` makes prefill free
    prefill_tokens_per_s: float = 8000.0
    #: time per output token with a batch of one
    tpot_base_s: float = 0.015
    #: relative slow-down of every decode step per extra running request
    tpot_batch_slope: float = 0.04
    #: KV-cache size; a request holds ``prompt_tokens + max_tokens`` of it while running
    kv_capacity_tokens: int = 131_072
    #: most requests running at once (vLLM's ``max_num_seqs``)
    max_num_seqs: int = 256
    #: longest ``prompt_tokens + max_tokens`` accepted; longer requests get a 400
    max_model_len: int = 32_768
    #: tokens per prefix-cache block (only full blocks are cached)
    block_tokens: int = 16
    #: prefix-cache capacity in blocks, evicted least recently used first
    prefix_cache_blocks: int = 8192
    #: ``max_tokens`` when a request gives none
    default_max_tokens: int = 16
    #: a completion's natural length (before ``max_tokens``) is uniform in ``[1, natural_tokens_max]``
    natural_tokens_max: int = 1024
    #: always generate exactly ``max_tokens`` (finish_reason ``length``), like vLLM's ``ignore_eos``
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ProfileError(f"{f.name} must be a boolean, not {value!r}")
            elif f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ProfileError(f"{f.name} must be a positive integer, not {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ProfileError(f"{f.name} must be a number, not {value!r}")
            elif value < 0:
                raise ProfileError(f"{f.name} must not be negative, not {value!r}")
        if self.prefill_tokens_per_s <= 0:
            raise ProfileError("prefill_tokens_per_s must be positive (use inf for free prefill)")
        if math.isinf(self.ttft_base_s) or math.isinf(self.tpot_base_s) or math.isinf(self.tpot_batch_slope):
            raise ProfileError("delays must be finite")

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def fast(cls) -> SimProfile:
        """No delays at all and capacity that never queues: for measuring the gateway itself."""
        return cls(
            ttft_base_s=0.0,
            prefill_tokens_per_s=math.inf,
            tpot_base_s=0.0,
            tpot_batch_slope=0.0,
            kv_capacity_tokens=1 << 40,
            max_num_seqs=1 << 30,
            max_model_len=1 << 30,
        )

    @classmethod
    def paced(cls, ttft_s: float = 0.05, tpot_s: float = 0.01) -> SimProfile:
        """A fixed ``ttft_s`` and ``tpot_s`` per token, whatever the prompt or batch (benchmarks)."""
        return cls(
            ttft_base_s=ttft_s,
            prefill_tokens_per_s=math.inf,
            tpot_base_s=tpot_s,
            tpot_batch_slope=0.0,
            kv_capacity_tokens=1 << 40,
            max_num_seqs=1 << 30,
            max_model_len=1 << 30,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SimProfile:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"unknown profile keys: {', '.join(map(str, unknown))}")
        values = dict(data)
        for name in ("ttft_base_s", "prefill_tokens_per_s", "tpot_base_s", "tpot_batch_slope"):
            # YAML and JSON both spell 1 for 1.0; accept it
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        return cls(**values)

    # -- the two formulas of the timing model ----------------------------------------------

    def prefill_s(self, uncached_prompt_tokens: int) -> float:
        """Time from admission to the first token."""
        return self.ttft_base_s + uncached_prompt_tokens / self.prefill_tokens_per_s

    def tpot_s(self, batch: int) -> float:
        """Time per output token while ``batch`` requests are running."""
        return self.tpot_base_s * (1.0 + self.tpot_batch_slope * max(batch - 1, 0))


def load_profile(path: str | Path) -> SimProfile:
    """Read a profile from a ``.json``, ``.yaml`` or ``.yml`` file (a flat mapping of fields)."""
    p = Path(path)
    raw = p.read_bytes()
    try:
        data = orjson.loads(raw) if p.suffix.lower() == ".json" else yaml.safe_load(raw)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise ProfileError(f"{p}: not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: a profile is a mapping of field names to values")
    return SimProfile.from_mapping(data)
