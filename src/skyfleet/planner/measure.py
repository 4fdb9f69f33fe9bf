"""Measure a live OpenAI-compatible engine and fit an :class:`~skyfleet.planner.types.EngineProfile`.

``skyfleet profile --endpoint URL`` (:mod:`skyfleet.cli.profile`) drives this module. Everything is
measured on the client side with streaming ``/v1/completions`` (raw prompts, so no chat template
changes the token counts; ``stream_options.include_usage`` for the engine's own prompt token count;
``ignore_eos`` so every request generates exactly ``max_tokens``, which vLLM and llama.cpp honour):

1. *Prefill sweep*, one request at a time: prompts of ``32 .. N`` tokens (bounded by the model's
   context), a couple of output tokens; least squares of TTFT on prompt tokens gives
   ``ttft_s = ttft_base_s + prompt_tokens / prefill_tokens_per_s``.
2. *Decode sweep*: ``c = 1, 2, 4, ...`` concurrent requests with a short prompt and a fixed output
   length; each request's inter-token time is ``(last token - first token) / (tokens - 1)``; least
   squares of that on ``c - 1`` gives ``tpot(B) = tpot_base_s * (1 + tpot_batch_slope * (B - 1))``.

Both fits run on the per-level medians (per prompt length, per concurrency), so one request disturbed
by a busy host does not drag the line.

Every prompt starts with a unique nonce so that no prefix cache (vLLM's, llama.cpp's per-slot cache)
makes it cheaper. The KV capacity comes from the engine where it says: vLLM's ``/metrics`` gauge
``vllm:cache_config_info`` (``num_gpu_blocks * block_size``), llama.cpp's ``/props`` (``n_ctx`` per slot x
``total_slots``); otherwise the caller passes it. The core (:func:`probe_engine`, :func:`run_sweep`) takes
an injected ``httpx.AsyncClient`` and a progress callback, and the fits (:func:`fit_prefill`,
:func:`fit_decode`) are pure functions.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import numpy as np
import orjson

from skyfleet.planner.types import EngineProfile

__all__ = [
    "EngineInfo",
    "MeasureError",
    "Measurement",
    "Sample",
    "SweepPlan",
    "fit_decode",
    "fit_prefill",
    "make_prompt",
    "probe_engine",
    "run_sweep",
    "summary_rows",
    "to_profile",
]

# Common English words that most tokenizers (Llama, Qwen, SmolLM) encode as one token each after a space.
_WORD_TEXT = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
          "have an they you were her she there one all we their has been if more when will would who so no "
          "time out up what about into than them can only other new some could these two may first then do "
          "any like my now over such our man me even most made after also did many before must through back "
          "years where much your way well down should because each just those people how too little state "
          "good very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used "
          "take three")
_WORDS = tuple(_WORD_TEXT.split())


class MeasureError(RuntimeError):
    """The engine did not answer as expected, or the measurements cannot be fitted."""


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """What to send. ``prompt_lengths`` (target tokens, at concurrency 1, ``prefill_repeats`` each, with
    ``prefill_output_tokens`` out) and ``concurrencies`` (``decode_rounds`` waves of ``c`` simultaneous
    requests of ``decode_prompt_tokens`` in, ``decode_output_tokens`` out)."""

    prompt_lengths: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    prefill_repeats: int = 3
    prefill_output_tokens: int = 2
    concurrencies: tuple[int, ...] = (1, 2, 4, 8)
    decode_rounds: int = 2
    decode_prompt_tokens: int = 32
    decode_output_tokens: int = 64
    warmup: bool = True

    @classmethod
    def geometric(cls, *, max_prompt_tokens: int, max_concurrency: int, **kw: int | bool) -> SweepPlan:
        """Prompts 32, 64, ... up to ``max_prompt_tokens`` (included), concurrency 1, 2, 4, ... up to
        ``max_concurrency`` (included)."""
        lengths = [n for n in (32 << i for i in range(16)) if n < max_prompt_tokens] + [max_prompt_tokens]
        conc = [c for c in (1 << i for i in range(12)) if c < max_concurrency] + [max_concurrency]
        return cls(prompt_lengths=tuple(sorted(set(lengths))), concurrencies=tuple(sorted(set(conc))),
                   **kw)  # type: ignore[arg-type]

    @property
    def requests(self) -> int:
        return (int(self.warmup) + len(self.prompt_lengths) * self.prefill_repeats
                + sum(self.concurrencies) * self.decode_rounds)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the engine says about itself (None where it does not)."""

    model: str
    engine: str | None  # "vllm", "llama", or None if unknown
    kv_capacity_tokens: int | None
    max_num_seqs: int | None
    max_model_len: int | None


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as the client saw it."""

    phase: str  # "prefill" | "decode" | "warmup"
    concurrency: int
    target_tokens: int  # the prompt length asked for
    prompt_tokens: int  # the engine's count (usage), else the target
    output_tokens: int  # content chunks received
    ttft_s: float
    itl_s: float | None  # mean inter-token time after the first; None with fewer than 2 tokens
    total_s: float


@dataclass(frozen=True, slots=True)
class Measurement:
    samples: tuple[Sample, ...]
    ttft_base_s: float
    prefill_tokens_per_s: float
    tpot_base_s: float
    tpot_batch_slope: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def requests(self) -> int:
        return len(self.samples)

    def predicted_ttft(self, prompt_tokens: float) -> float:
        return self.ttft_base_s + prompt_tokens / self.prefill_tokens_per_s

    def predicted_tpot(self, batch: float) -> float:
        return self.tpot_base_s * (1.0 + self.tpot_batch_slope * max(batch - 1.0, 0.0))


# -- pure parts ----------------------------------------------------------------------------------------


def make_prompt(tokens: int, nonce: str) -> str:
    """About ``tokens`` tokens of plain words, starting with ``nonce`` (defeats prefix caches)."""
    words = [_WORDS[(i * 7 + len(nonce)) % len(_WORDS)] for i in range(max(tokens - 4, 1))]
    return f"{nonce}: " + " ".join(words)


def _lstsq(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.size < 2 or float(np.ptp(xs)) == 0.0:
        raise MeasureError("need measurements at two or more different x values to fit a line")
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


def fit_prefill(prompt_tokens: Sequence[float], ttft_s: Sequence[float]) -> tuple[float, float, list[str]]:
    """``(ttft_base_s, prefill_tokens_per_s, notes)`` from least squares ``ttft = base + n / rate``.

    A negative intercept (noise around a near-zero overhead) is clamped to 0 and noted; a TTFT that
    does not grow with the prompt is a :class:`MeasureError` (widen the sweep)."""
    base, per_token = _lstsq(prompt_tokens, ttft_s)
    notes = []
    if not per_token > 0:
        raise MeasureError(f"TTFT did not grow with the prompt length (slope {per_token:.3g} s/token); "
                           "use longer prompts")
    if base < 0:
        if base < -1e-9:  # not just rounding
            notes.append(f"ttft_base_s fitted {base:.4f} s < 0, clamped to 0")
        base = 0.0
    return base, 1.0 / per_token, notes


def fit_decode(batch: Sequence[float], itl_s: Sequence[float]) -> tuple[float, float, list[str]]:
    """``(tpot_base_s, tpot_batch_slope, notes)`` from least squares ``itl = a + b (B - 1)``, so
    ``tpot_base_s = a`` and ``tpot_batch_slope = b / a``; a negative slope is clamped to 0 and noted."""
    a, b = _lstsq([c - 1 for c in batch], itl_s)
    notes = []
    if not a > 0:
        raise MeasureError(f"inter-token time at batch 1 fitted {a:.3g} s, not positive")
    if b < 0:
        if b / a < -1e-9:  # not just rounding
            notes.append(f"tpot_batch_slope fitted {b / a:.4f} < 0 (no slow-down with batch), clamped to 0")
        b = 0.0
    return a, b / a, notes


def to_profile(m: Measurement, info: EngineInfo, *, gpu: str, gpus: int, endpoint: str,
               cold_start_s: float, cold_start_note: str, engine: str | None = None,
               kv_capacity_tokens: int | None = None, max_num_seqs: int | None = None,
               max_model_len: int | None = None, model: str | None = None,
               now: datetime | None = None) -> EngineProfile:
    """The profile from a measurement, the engine's own numbers, and the caller's overrides (which win)."""
    kv = kv_capacity_tokens or info.kv_capacity_tokens
    if kv is None:
        raise MeasureError("the engine does not report its KV-cache size; pass --kv-capacity TOKENS")
    seqs = max_num_seqs or info.max_num_seqs or 256
    mml = max_model_len or info.max_model_len or min(kv, 32_768)
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%MZ")
    source = (f"measured: {endpoint} {when} ({m.requests} requests); cold_start_s: {cold_start_note}"
              + "".join(f"; {n}" for n in m.notes))
    return EngineProfile(
        gpu=gpu, gpus=gpus, model=model or info.model, engine=engine or info.engine or "unknown",
        prefill_tokens_per_s=round(m.prefill_tokens_per_s, 3), ttft_base_s=round(m.ttft_base_s, 6),
        tpot_base_s=round(m.tpot_base_s, 6), tpot_batch_slope=round(m.tpot_batch_slope, 6),
        kv_capacity_tokens=int(kv), max_num_seqs=int(seqs), cold_start_s=float(cold_start_s), source=source,
        max_model_len=int(mml))


# -- talking to the engine -----------------------------------------------------------------------------------


def _cache_config(text: str) -> int | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("vllm:cache_config_info"):
                    blocks, size = s.labels.get("num_gpu_blocks"), s.labels.get("block_size")
                    if blocks and size and blocks.isdigit() and size.isdigit():
                        return int(blocks) * int(size)
    except (ValueError, IndexError, KeyError):
        return None
    return None


async def probe_engine(client: httpx.AsyncClient, model: str | None = None) -> EngineInfo:
    """Ask the engine for its model, kind and KV-cache size (``/v1/models``, ``/props``, ``/metrics``)."""
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise MeasureError(f"GET /v1/models answered {r.status_code}: {r.text[:200]}")
    cards = r.json().get("data") or []
    if model is None:
        if not cards:
            raise MeasureError("the engine lists no models; pass --model")
        model = str(cards[0]["id"])
    card = next((c for c in cards if c.get("id") == model), {})
    max_len = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
    props = await client.get("/props")
    if props.status_code == 200:
        try:
            body = props.json()
            slots = int(body["total_slots"])
            n_ctx = int(body["default_generation_settings"]["n_ctx"])
            return EngineInfo(model=model, engine="llama", kv_capacity_tokens=n_ctx * slots, max_num_seqs=slots,
                              max_model_len=n_ctx)
        except (KeyError, TypeError, ValueError):
            pass
    metrics = await client.get("/metrics")
    if metrics.status_code == 200 and "vllm:" in metrics.text:
        return EngineInfo(model=model, engine="vllm", kv_capacity_tokens=_cache_config(metrics.text),
                          max_num_seqs=None, max_model_len=max_len)
    return EngineInfo(model=model, engine=None, kv_capacity_tokens=None, max_num_seqs=None, max_model_len=max_len)


async def _one(client: httpx.AsyncClient, model: str, *, phase: str, concurrency: int, prompt_tokens: int,
               max_tokens: int) -> Sample:
    body = {"model": model, "prompt": make_prompt(prompt_tokens, "Request " + secrets.token_hex(4)),
            "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    times: list[float] = []
    usage_prompt: int | None = None
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise MeasureError(f"POST /v1/completions answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = orjson.loads(data)
            now = time.perf_counter()
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    times.append(now)
            if isinstance(chunk.get("usage"), dict):
                usage_prompt = chunk["usage"].get("prompt_tokens")
    end = time.perf_counter()
    if not times:
        raise MeasureError("a streamed completion produced no tokens")
    itl = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return Sample(phase=phase, concurrency=concurrency, target_tokens=prompt_tokens,
                  prompt_tokens=int(usage_prompt) if isinstance(usage_prompt, int) else prompt_tokens,
                  output_tokens=len(times), ttft_s=times[0] - start, itl_s=itl, total_s=end - start)


async def run_sweep(client: httpx.AsyncClient, model: str, plan: SweepPlan,
                    progress: Callable[[Sample], None] | None = None) -> Measurement:
    """Send ``plan`` to the engine behind ``client`` (base URL set; auth headers set) and fit the profile
    numbers. ``progress`` is called after every request."""
    samples: list[Sample] = []

    def done(s: Sample) -> Sample:
        samples.append(s)
        if progress is not None:
            progress(s)
        return s

    if plan.warmup:
        done(await _one(client, model, phase="warmup", concurrency=1, prompt_tokens=plan.decode_prompt_tokens,
                        max_tokens=plan.prefill_output_tokens))
    for n in plan.prompt_lengths:
        for _ in range(plan.prefill_repeats):
            done(await _one(client, model, phase="prefill", concurrency=1, prompt_tokens=n,
                            max_tokens=plan.prefill_output_tokens))
    for c in plan.concurrencies:
        for _ in range(plan.decode_rounds):
            wave = [_one(client, model, phase="decode", concurrency=c, prompt_tokens=plan.decode_prompt_tokens,
                         max_tokens=plan.decode_output_tokens) for _ in range(c)]
            for s in await asyncio.gather(*wave):
                done(s)
    base, rate, notes_p, tpot, slope, notes_d = _fit(samples)
    for value in (base, rate, tpot, slope):
        if not math.isfinite(value):  # pragma: no cover - the fits reject these
            raise MeasureError("a fitted value is not finite")
    return Measurement(samples=tuple(samples), ttft_base_s=base, prefill_tokens_per_s=rate, tpot_base_s=tpot,
                       tpot_batch_slope=slope, notes=tuple(notes_p + notes_d))


def _median_by(pairs: Sequence[tuple[int, float, float]]) -> tuple[list[float], list[float]]:
    """Per group key: (median x, median y). Medians keep one disturbed request (a busy host) from
    dragging a least-squares line."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for key, x, y in pairs:
        groups.setdefault(key, []).append((x, y))
    xs = [float(np.median([x for x, _ in g])) for _, g in sorted(groups.items())]
    ys = [float(np.median([y for _, y in g])) for _, g in sorted(groups.items())]
    return xs, ys


def _fit(samples: Sequence[Sample]) -> tuple[float, float, list[str], float, float, list[str]]:
    pre = [(s.target_tokens, float(s.prompt_tokens), s.ttft_s) for s in samples if s.phase == "prefill"]
    dec = [(s.concurrency, float(s.concurrency), s.itl_s) for s in samples
           if s.phase == "decode" and s.itl_s is not None]
    base, rate, notes_p = fit_prefill(*_median_by(pre))
    tpot, slope, notes_d = fit_decode(*_median_by(dec))  # type: ignore[arg-type]
    return base, rate, notes_p, tpot, slope, notes_d


def summary_rows(m: Measurement) -> list[str]:
    """Human-readable lines: observed vs fitted, per prompt length and per concurrency."""
    lines = []
    pre = [s for s in m.samples if s.phase == "prefill"]
    for n in sorted({s.target_tokens for s in pre}):
        group = [s for s in pre if s.target_tokens == n]
        tokens = float(np.median([s.prompt_tokens for s in group]))
        obs = [s.ttft_s for s in group]
        lines.append(f"prefill {tokens:6.0f} tokens: ttft {np.median(obs) * 1000:8.1f} ms observed (median), "
                     f"{m.predicted_ttft(tokens) * 1000:8.1f} ms fitted ({len(obs)} requests)")
    dec = [s for s in m.samples if s.phase == "decode" and s.itl_s is not None]
    for c in sorted({s.concurrency for s in dec}):
        obs = [s.itl_s or 0.0 for s in dec if s.concurrency == c]
        lines.append(f"decode batch {c:4d}: tpot {np.median(obs) * 1000:8.2f} ms observed (median), "
                     f"{m.predicted_tpot(c) * 1000:8.2f} ms fitted ({len(obs)} requests)")
    return lines
