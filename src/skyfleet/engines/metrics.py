"""Engine metric adapters: one typed snapshot from each engine's Prometheus ``/metrics`` text.

``parse_metrics(kind, text)`` reads the text with ``prometheus_client``'s parser and fills an
:class:`EngineMetrics` through that engine's :class:`Adapter`, a table from normalised field to the
engine's sample names. Adding an engine means adding a table to ``ADAPTERS``.

Normalised fields (same meaning for every engine):

* ``requests_running``: sequences being processed now. ``requests_waiting``: admitted but queued.
  Both are 0.0 when the engine has not exported the gauge yet (SGLang only creates its gauges at
  the first scheduler log, so an absent gauge means an idle engine, not an error).
* ``kv_cache_usage``: fraction 0..1 of the KV-cache pool in use.
* ``prompt_tokens_total``: prompt tokens of all requests, *including* the ones served from the
  prefix cache. ``cached_prompt_tokens_total``: the part served from the prefix cache.
  ``generation_tokens_total``: generated tokens. ``requests_total``: finished requests.
* ``ttft_seconds``, ``tpot_seconds`` (inter-token latency), ``e2e_seconds``, ``queue_seconds``:
  cumulative latency histograms.

Sample names per engine, in the order tried (first present wins; ``+`` adds an optional part):

vLLM, and ``sim`` (skyfleet's simulated engine exports vLLM names); series labelled ``model_name``,
``engine`` (data-parallel rank) and, for requests, ``finished_reason``:

* requests_running: ``vllm:num_requests_running``; requests_waiting: ``vllm:num_requests_waiting``
* kv_cache_usage: ``vllm:kv_cache_usage_perc``, then ``vllm:gpu_cache_usage_perc`` (the older
  name, deprecated in vLLM 0.9; both are 0..1 fractions despite "perc")
* prompt_tokens_total: ``vllm:prompt_tokens_total`` (whole prompts, cached part included)
* cached_prompt_tokens_total: ``vllm:prompt_tokens_cached_total``, then
  ``vllm:prefix_cache_hits_total``, then ``vllm:gpu_prefix_cache_hits_total`` only if its HELP text
  counts tokens (vLLM 0.7/0.8 counted KV blocks); None on the V0 engine (hit-rate gauges only)
* generation_tokens_total: ``vllm:generation_tokens_total``
* requests_total: ``vllm:request_success_total``, summed over every ``finished_reason``
* ttft: ``vllm:time_to_first_token_seconds``; tpot: ``vllm:inter_token_latency_seconds``, then
  ``vllm:time_per_output_token_seconds`` (its older name); e2e:
  ``vllm:e2e_request_latency_seconds``; queue: ``vllm:request_queue_time_seconds``

SGLang; series labelled ``model_name`` (newer releases add ``engine_type``, ``tp_rank``,
``pp_rank``, ``cache_source`` ...):

* requests_running: ``sglang:num_running_reqs``
* requests_waiting: ``sglang:num_queue_reqs`` + ``sglang:num_grammar_queue_reqs`` (requests parked
  while their grammar compiles, a queue of their own)
* kv_cache_usage: ``sglang:token_usage`` (used / total tokens of the KV pool)
* prompt_tokens_total: ``sglang:prompt_tokens_total``; generation_tokens_total:
  ``sglang:generation_tokens_total``; cached_prompt_tokens_total: ``sglang:cached_tokens_total``
  (None on releases that only export the ``sglang:cache_hit_rate`` gauge)
* requests_total: ``sglang:num_requests_total``, then ``sglang:e2e_request_latency_seconds_count``
  (older releases: one e2e observation per finished request)
* ttft: ``sglang:time_to_first_token_seconds``; tpot: ``sglang:inter_token_latency_seconds``, then
  ``sglang:time_per_output_token_seconds`` (older name); e2e: ``sglang:e2e_request_latency_seconds``;
  queue: ``sglang:queue_time_seconds``

llama.cpp server (also xllamacpp); no labels, one model per server, no histograms:

* requests_running: ``llamacpp:requests_processing`` (busy slots); requests_waiting:
  ``llamacpp:requests_deferred`` (requests waiting for a free slot)
* kv_cache_usage: ``llamacpp:kv_cache_usage_ratio``, which older builds exported; current builds
  (see tests/engines/fixtures/llamacpp_metrics.txt) export no KV usage, so None
* prompt_tokens_total: ``llamacpp:prompt_tokens_total`` (computed prompt tokens only) +
  ``llamacpp:prompt_tokens_cached_total``; cached_prompt_tokens_total:
  ``llamacpp:prompt_tokens_cached_total``; generation_tokens_total: ``llamacpp:tokens_predicted_total``
* requests_total and all histograms: None (not exported)

Not mapped on purpose: vLLM ``vllm:num_requests_swapped`` (V0 preempted-to-CPU requests, not
queued ones), ``vllm:request_time_per_output_token_seconds`` (a per-request mean, not the
per-token distribution), SGLang ``sglang:cache_hit_rate`` (a gauge, no token count).

Aggregation over label sets (after the ``model`` filter): request counts, counters and histogram
buckets are summed, because the series split one server's work (vLLM: one ``engine`` per
data-parallel rank, ``finished_reason``; SGLang: ``cache_source``, and by default one scheduler
series per data-parallel group, since only its attention-TP rank 0 reports). Caveat: an SGLang
server started with ``--enable-metrics-for-all-schedulers`` reports the same batch from every TP
rank, so its request counts come out multiplied by the TP size. Usage fractions are averaged (one
KV pool per engine; the pools of one server are the same size). Histograms whose bucket bounds differ are
merged on the union of bounds, each series counting as its largest own bound at or below (exact
when the bounds agree, a lower bound otherwise). ``model`` keeps series whose ``model_name`` equals
it, plus series without that label; llama.cpp has no model label and serves one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from itertools import pairwise
from typing import Literal, get_args

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "ADAPTERS",
    "Adapter",
    "EngineKind",
    "EngineMetrics",
    "Histogram",
    "MetricsParseError",
    "Scalar",
    "Source",
    "parse_metrics",
]

EngineKind = Literal["llama", "vllm", "sglang", "sim"]
_INF = math.inf


class MetricsParseError(ValueError):
    """The /metrics text is malformed (bad exposition syntax, or an inconsistent histogram)."""


@dataclass(frozen=True, slots=True)
class Histogram:
    """A cumulative Prometheus histogram, summed over the series it was built from."""

    buckets: tuple[tuple[float, float], ...]  # (upper bound le, cumulative count), ascending, +Inf last
    sum: float
    count: float

    def __post_init__(self) -> None:
        if not self.buckets or self.buckets[-1][0] != _INF:
            raise ValueError("a histogram needs buckets ending with le=+Inf")
        prev_le, prev_count = -_INF, 0.0
        for le, count in self.buckets:
            if math.isnan(le) or le <= prev_le:
                raise ValueError(f"bucket bounds must be strictly ascending, got {le} after {prev_le}")
            if math.isnan(count) or count < prev_count:
                raise ValueError(f"cumulative counts must not decrease, got {count} after {prev_count}")
            prev_le, prev_count = le, count

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile like PromQL ``histogram_quantile``; None if nothing was observed.

        Linear interpolation inside the bucket holding rank ``q * total``; the first bucket starts at
        0 (or is its own bound if that is <= 0); a rank in the +Inf bucket gives the highest finite
        bound. Unlike Prometheus, q=0 gives the lower edge of the first non-empty bucket, not NaN.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
        total = self.buckets[-1][1]
        if total <= 0 or len(self.buckets) < 2:
            return None
        rank = q * total
        index = next(i for i, (_, count) in enumerate(self.buckets) if count >= rank and count > 0)
        le, count = self.buckets[index]
        if le == _INF:
            return self.buckets[-2][0]
        if index == 0 and le <= 0:
            return le
        start, before = (0.0, 0.0) if index == 0 else self.buckets[index - 1]
        return start + (le - start) * (rank - before) / (count - before)

    def minus(self, earlier: Histogram) -> Histogram:
        """Observations made since ``earlier``; ``self`` whole when the counters were reset.

        A reset is any bucket, or the count, going down, or a change of bucket bounds (a restarted
        engine): the observations since the restart are then all of ``self``.
        """
        if [le for le, _ in self.buckets] != [le for le, _ in earlier.buckets] or self.count < earlier.count:
            return self
        deltas, prev_now, prev_then = [], 0.0, 0.0
        for (le, now), (_, then) in zip(self.buckets, earlier.buckets, strict=True):
            if now - prev_now < then - prev_then:  # fewer observations in this bucket than before
                return self
            deltas.append((le, now - then))
            prev_now, prev_then = now, then
        return Histogram(tuple(deltas), self.sum - earlier.sum, self.count - earlier.count)


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    engine: EngineKind
    requests_running: float
    requests_waiting: float
    kv_cache_usage: float | None
    prompt_tokens_total: float | None
    generation_tokens_total: float | None
    cached_prompt_tokens_total: float | None
    requests_total: float | None
    ttft_seconds: Histogram | None
    tpot_seconds: Histogram | None
    e2e_seconds: Histogram | None
    queue_seconds: Histogram | None


_FIELDS = frozenset(f.name for f in fields(EngineMetrics)) - {"engine"}


@dataclass(frozen=True, slots=True)
class Source:
    """One sample name; ``help_mentions``: use it only if its HELP text contains this word."""

    name: str
    help_mentions: str | None = None


@dataclass(frozen=True, slots=True)
class Scalar:
    """A normalised number: the first of ``sources`` present, plus every ``plus`` present."""

    sources: tuple[str | Source, ...]
    aggregate: Literal["sum", "mean"] = "sum"
    plus: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Adapter:
    """How one engine's sample names map onto :class:`EngineMetrics` fields."""

    scalars: Mapping[str, Scalar]
    histograms: Mapping[str, tuple[str, ...]]  # field -> histogram base names, first present wins
    model_label: str | None = None  # label naming the served model, for the ``model`` filter

    def __post_init__(self) -> None:
        unknown = (set(self.scalars) | set(self.histograms)) - _FIELDS
        if unknown:
            raise ValueError(f"adapter maps unknown fields {sorted(unknown)}")


_VLLM = Adapter(
    model_label="model_name",
    scalars={
        "requests_running": Scalar(("vllm:num_requests_running",)),
        "requests_waiting": Scalar(("vllm:num_requests_waiting",)),
        "kv_cache_usage": Scalar(("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), "mean"),
        "prompt_tokens_total": Scalar(("vllm:prompt_tokens_total",)),
        "generation_tokens_total": Scalar(("vllm:generation_tokens_total",)),
        "cached_prompt_tokens_total": Scalar(
            (
                "vllm:prompt_tokens_cached_total",
                "vllm:prefix_cache_hits_total",
                Source("vllm:gpu_prefix_cache_hits_total", help_mentions="tokens"),
            )
        ),
        "requests_total": Scalar(("vllm:request_success_total",)),
    },
    histograms={
        "ttft_seconds": ("vllm:time_to_first_token_seconds",),
        "tpot_seconds": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        "e2e_seconds": ("vllm:e2e_request_latency_seconds",),
        "queue_seconds": ("vllm:request_queue_time_seconds",),
    },
)

_SGLANG = Adapter(
    model_label="model_name",
    scalars={
        "requests_running": Scalar(("sglang:num_running_reqs",)),
        "requests_waiting": Scalar(("sglang:num_queue_reqs",), plus=("sglang:num_grammar_queue_reqs",)),
        "kv_cache_usage": Scalar(("sglang:token_usage",), "mean"),
        "prompt_tokens_total": Scalar(("sglang:prompt_tokens_total",)),
        "generation_tokens_total": Scalar(("sglang:generation_tokens_total",)),
        "cached_prompt_tokens_total": Scalar(("sglang:cached_tokens_total",)),
        "requests_total": Scalar(("sglang:num_requests_total", "sglang:e2e_request_latency_seconds_count")),
    },
    histograms={
        "ttft_seconds": ("sglang:time_to_first_token_seconds",),
        "tpot_seconds": ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
        "e2e_seconds": ("sglang:e2e_request_latency_seconds",),
        "queue_seconds": ("sglang:queue_time_seconds",),
    },
)

_LLAMA = Adapter(
    scalars={
        "requests_running": Scalar(("llamacpp:requests_processing",)),
        "requests_waiting": Scalar(("llamacpp:requests_deferred",)),
        "kv_cache_usage": Scalar(("llamacpp:kv_cache_usage_ratio",), "mean"),
        # prompt_tokens_total counts only the prompt tokens that were computed, not the cached ones
        "prompt_tokens_total": Scalar(
            ("llamacpp:prompt_tokens_total",), plus=("llamacpp:prompt_tokens_cached_total",)
        ),
        "generation_tokens_total": Scalar(("llamacpp:tokens_predicted_total",)),
        "cached_prompt_tokens_total": Scalar(("llamacpp:prompt_tokens_cached_total",)),
    },
    histograms={},
)

ADAPTERS: Mapping[EngineKind, Adapter] = {"llama": _LLAMA, "vllm": _VLLM, "sglang": _SGLANG, "sim": _VLLM}
if set(ADAPTERS) != set(get_args(EngineKind)):  # pragma: no cover - guards edits of the tables
    raise RuntimeError("ADAPTERS must cover every EngineKind")

_Series = list[tuple[dict[str, str], float]]
_Lookup = Callable[[str], _Series]


def parse_metrics(kind: EngineKind, text: str, *, model: str | None = None) -> EngineMetrics:
    """Normalise one scrape of an engine's ``/metrics`` text (see the module docstring)."""
    try:
        adapter = ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {sorted(ADAPTERS)}") from None
    samples, helps = _read(text)

    def keep(labels: Mapping[str, str]) -> bool:
        return model is None or adapter.model_label is None or labels.get(adapter.model_label, model) == model

    def series(name: str) -> _Series:
        return [(labels, value) for labels, value in samples.get(name, ()) if keep(labels)]

    values: dict[str, float | Histogram | None] = {}
    for name, spec in adapter.scalars.items():
        values[name] = _scalar(spec, series, helps)
    for name, bases in adapter.histograms.items():
        values[name] = next((h for base in bases if (h := _histogram(base, series)) is not None), None)
    for name in _FIELDS - values.keys():
        values[name] = None
    for name in ("requests_running", "requests_waiting"):
        if values[name] is None:
            values[name] = 0.0
    return EngineMetrics(engine=kind, **values)  # type: ignore[arg-type]


def _read(text: str) -> tuple[dict[str, _Series], dict[str, str]]:
    samples: dict[str, _Series] = {}
    helps: dict[str, str] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
                helps.setdefault(sample.name, family.documentation)
    except (ValueError, IndexError, KeyError) as exc:
        raise MetricsParseError(f"malformed Prometheus text: {exc}") from exc
    return samples, helps


def _scalar(spec: Scalar, series: _Lookup, helps: Mapping[str, str]) -> float | None:
    for source in spec.sources:
        src = source if isinstance(source, Source) else Source(source)
        if src.help_mentions is not None and src.help_mentions not in helps.get(src.name, src.help_mentions):
            continue
        found = [value for _, value in series(src.name) if not math.isnan(value)]
        if found:
            total = math.fsum(found) if spec.aggregate == "sum" else math.fsum(found) / len(found)
            extra = [value for name in spec.plus for _, value in series(name) if not math.isnan(value)]
            return total + math.fsum(extra)
    return None


def _histogram(base: str, series: _Lookup) -> Histogram | None:
    per_series: dict[frozenset[tuple[str, str]], dict[float, float]] = {}
    for sample_labels, value in series(f"{base}_bucket"):
        labels = dict(sample_labels)
        try:
            le = float(labels.pop("le"))
        except (KeyError, ValueError) as exc:
            raise MetricsParseError(f"{base}_bucket sample without a numeric le label") from exc
        per_series.setdefault(frozenset(labels.items()), {})[le] = value
    if not per_series:
        return None
    bounds = sorted({le for buckets in per_series.values() for le in buckets})
    merged = [0.0] * len(bounds)
    for key, buckets in per_series.items():
        own = sorted(buckets.items())
        if own[-1][0] != _INF or any(b[1] < a[1] for a, b in pairwise(own)):
            raise MetricsParseError(f"{base}{dict(key)}: buckets must end at le=+Inf and never decrease")
        position, current = 0, 0.0
        for i, le in enumerate(bounds):
            while position < len(own) and own[position][0] <= le:
                current = own[position][1]
                position += 1
            merged[i] += current
    counts = [value for _, value in series(f"{base}_count")]
    try:
        return Histogram(
            buckets=tuple(zip(bounds, merged, strict=True)),
            sum=math.fsum(value for _, value in series(f"{base}_sum")),
            count=math.fsum(counts) if counts else merged[-1],
        )
    except ValueError as exc:
        raise MetricsParseError(f"{base}: {exc}") from exc
