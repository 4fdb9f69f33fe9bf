"""Engine metric adapters against recorded /metrics texts (see fixtures/README.md) and hand-made cases.

Texts written inline here are marked either as copied from a real scrape (with their source) or as
made up for the test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Histogram as PromHistogram

from skyfleet.engines.metrics import (
    ADAPTERS,
    EngineMetrics,
    Histogram,
    MetricsParseError,
    parse_metrics,
)

FIXTURES = Path(__file__).parent / "fixtures"
INF = math.inf


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- recorded texts ------------------------------------------------------------------------------


def test_llamacpp_fixture_two_requests_in_flight() -> None:
    m = parse_metrics("llama", fixture("llamacpp_metrics.txt"))
    assert m.engine == "llama"
    assert m.requests_running == 2  # llamacpp:requests_processing
    assert m.requests_waiting == 0  # llamacpp:requests_deferred
    assert m.kv_cache_usage is None  # this build exports no KV usage
    assert m.prompt_tokens_total == 69 + 102  # computed + reused from the cache
    assert m.cached_prompt_tokens_total == 102
    assert m.generation_tokens_total == 42  # llamacpp:tokens_predicted_total
    assert m.requests_total is None
    assert (m.ttft_seconds, m.tpot_seconds, m.e2e_seconds, m.queue_seconds) == (None,) * 4


def test_llamacpp_ignores_the_model_filter() -> None:
    text = fixture("llamacpp_metrics.txt")
    assert parse_metrics("llama", text, model="anything") == parse_metrics("llama", text)


def test_vllm_fixture_older_names() -> None:
    m = parse_metrics("vllm", fixture("vllm_metrics.txt"))
    assert m.engine == "vllm"
    assert (m.requests_running, m.requests_waiting) == (0.0, 0.0)
    assert m.kv_cache_usage == 0.0  # from vllm:gpu_cache_usage_perc, the pre-rename name
    assert m.prompt_tokens_total == 148.0
    assert m.generation_tokens_total == 955.0
    assert m.requests_total == 4.0  # finished_reason="stop"
    assert m.cached_prompt_tokens_total is None  # the V0 engine exports hit-rate gauges only
    # the text's only histogram (iteration_tokens_total, cut short at the source) is not mapped
    assert (m.ttft_seconds, m.tpot_seconds, m.e2e_seconds, m.queue_seconds) == (None,) * 4


def test_vllm_fixture_filtered_by_its_model_and_by_another() -> None:
    text = fixture("vllm_metrics.txt")
    assert parse_metrics("vllm", text, model="Qwen/Qwen2.5-Coder-1.5B-Instruct") == parse_metrics(
        "vllm", text
    )
    other = parse_metrics("vllm", text, model="meta-llama/Llama-3.1-8B-Instruct")
    assert other.prompt_tokens_total is None and other.requests_total is None
    assert other.requests_running == 0.0


# Copied verbatim (whole lines only) from a vLLM 0.10.0 scrape pasted in
# https://github.com/vllm-project/production-stack/issues/617 (model zai-org/GLM-4.5, V1 engine).
VLLM_0_10_EXCERPT = """\
# HELP vllm:gpu_prefix_cache_queries_created GPU prefix cache queries, in terms of number of queriedtokens. DEPRECATED: Use vllm:prefix_cache_queries instead.
# TYPE vllm:gpu_prefix_cache_queries_created gauge
vllm:gpu_prefix_cache_queries_created{engine="0",model_name="zai-org/GLM-4.5"} 1.7537953269352946e+09
# HELP vllm:gpu_prefix_cache_hits_total GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="zai-org/GLM-4.5"} 0.0
# HELP vllm:gpu_prefix_cache_hits_created GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.
# TYPE vllm:gpu_prefix_cache_hits_created gauge
vllm:gpu_prefix_cache_hits_created{engine="0",model_name="zai-org/GLM-4.5"} 1.7537953269353123e+09
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="zai-org/GLM-4.5"} 9.75010481363281e-06
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="zai-org/GLM-4.5"} 32.0
"""


def test_vllm_v1_excerpt_current_names() -> None:
    m = parse_metrics("vllm", VLLM_0_10_EXCERPT)
    assert m.kv_cache_usage == pytest.approx(9.75010481363281e-06)
    assert m.cached_prompt_tokens_total == 0.0  # deprecated name, accepted: its HELP counts tokens
    assert m.requests_running == 0.0  # not in the excerpt
    assert m.prompt_tokens_total is None


def test_sim_uses_the_vllm_adapter() -> None:
    text = fixture("vllm_metrics.txt")
    sim, vllm = parse_metrics("sim", text), parse_metrics("vllm", text)
    assert sim.engine == "sim"
    assert sim == EngineMetrics(**{**{f: getattr(vllm, f) for f in vllm.__slots__}, "engine": "sim"})


def test_sglang_fixture() -> None:
    m = parse_metrics("sglang", fixture("sglang_metrics.txt"))
    assert m.engine == "sglang"
    assert m.requests_running == 162.0
    assert m.requests_waiting == 2826.0
    assert m.kv_cache_usage == 0.28
    assert m.prompt_tokens_total == 8.128902e06
    assert m.generation_tokens_total == 7.557572e06
    assert m.cached_prompt_tokens_total is None  # only the sglang:cache_hit_rate gauge
    assert m.requests_total == 11228.0  # no num_requests_total in this release: e2e count
    assert m.queue_seconds is None

    ttft = m.ttft_seconds
    assert ttft is not None
    assert (ttft.count, ttft.sum) == (11008.0, 2.3518979474117756e06)
    assert len(ttft.buckets) == 21 and ttft.buckets[-1] == (INF, 11008.0)
    assert ttft.buckets[15] == (10.0, 1330.0)
    # p10: rank 1100.8 lies in (7.5, 10]: 941 below, 389 inside -> 7.5 + 2.5 * 159.8 / 389
    assert ttft.quantile(0.1) == pytest.approx(8.52699228, abs=1e-8)
    # p50: rank 5504 > 2513 (count at le=30), i.e. in the +Inf bucket -> highest finite bound
    assert ttft.quantile(0.5) == 30.0

    tpot = m.tpot_seconds  # from sglang:time_per_output_token_seconds (older name)
    assert tpot is not None and tpot.count == 7.400757e06
    # p50: rank 3700378.5 in (0.075, 0.1]: 433413 below, 4516782 inside
    assert tpot.quantile(0.5) == pytest.approx(0.075 + 0.025 * 3266965.5 / 4516782)

    e2e = m.e2e_seconds
    assert e2e is not None and (e2e.count, e2e.buckets[1]) == (11228.0, (0.5, 6.0))


# --- aggregation and filtering (made-up texts) ------------------------------------------------------

# Made up: one vLLM server with two data-parallel engines.
VLLM_TWO_ENGINES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# TYPE vllm:prompt_tokens_cached counter
vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 30.0
vllm:prompt_tokens_cached_total{engine="1",model_name="m"} 12.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 999.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 0.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 7.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 100.0
vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 100.0
vllm:time_per_output_token_seconds_count{engine="0",model_name="m"} 100.0
vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 5.0
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="m"} 1.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.1",model_name="m"} 3.0
vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 4.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 0.5
vllm:inter_token_latency_seconds_bucket{engine="1",le="0.01",model_name="m"} 0.0
vllm:inter_token_latency_seconds_bucket{engine="1",le="0.1",model_name="m"} 2.0
vllm:inter_token_latency_seconds_bucket{engine="1",le="+Inf",model_name="m"} 2.0
vllm:inter_token_latency_seconds_count{engine="1",model_name="m"} 2.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="m"} 0.25
"""


def test_vllm_sums_engines_and_prefers_current_names() -> None:
    m = parse_metrics("vllm", VLLM_TWO_ENGINES)
    assert (m.requests_running, m.requests_waiting) == (5.0, 4.0)
    assert m.kv_cache_usage == 0.5  # mean of the two engines' pools; the old name is ignored
    assert m.cached_prompt_tokens_total == 42.0  # prompt_tokens_cached wins over prefix_cache_hits
    assert m.requests_total == 13.0  # every finished_reason of every engine
    assert m.tpot_seconds == Histogram(((0.01, 1.0), (0.1, 5.0), (INF, 6.0)), sum=0.75, count=6.0)


# Made up: two models behind one endpoint (e.g. an aggregating proxy).
TWO_MODELS = """\
vllm:num_requests_running{engine="0",model_name="a"} 1.0
vllm:num_requests_running{engine="0",model_name="b"} 10.0
vllm:prompt_tokens_total{engine="0",model_name="a"} 100.0
vllm:prompt_tokens_total{engine="0",model_name="b"} 1000.0
vllm:cache_config_info{block_size="16",engine="0"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="a"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="a"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="b"} 7.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="b"} 8.0
"""


def test_model_filter_keeps_one_models_series() -> None:
    a = parse_metrics("vllm", TWO_MODELS, model="a")
    b = parse_metrics("vllm", TWO_MODELS, model="b")
    both = parse_metrics("vllm", TWO_MODELS)
    assert (a.requests_running, b.requests_running, both.requests_running) == (1.0, 10.0, 11.0)
    assert (a.prompt_tokens_total, b.prompt_tokens_total, both.prompt_tokens_total) == (100.0, 1000.0, 1100.0)
    assert a.ttft_seconds == Histogram(((0.5, 1.0), (INF, 2.0)), sum=0.0, count=2.0)
    # different bucket bounds merge on their union; a series counts at its largest bound below
    assert both.ttft_seconds == Histogram(((0.5, 1.0), (1.0, 8.0), (INF, 10.0)), sum=0.0, count=10.0)
    nobody = parse_metrics("vllm", TWO_MODELS, model="c")
    assert (nobody.requests_running, nobody.prompt_tokens_total, nobody.ttft_seconds) == (0.0, None, None)


# Made up, with the labels and names of newer SGLang releases.
SGLANG_NEWER = """\
sglang:num_running_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 7.0
sglang:num_queue_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 3.0
sglang:num_grammar_queue_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 2.0
sglang:token_usage{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 0.5
sglang:cached_tokens_total{cache_source="device",engine_type="unified",model_name="m"} 40.0
sglang:cached_tokens_total{cache_source="host",engine_type="unified",model_name="m"} 2.0
sglang:num_requests_total{engine_type="unified",model_name="m"} 9.0
sglang:e2e_request_latency_seconds_bucket{engine_type="unified",le="+Inf",model_name="m"} 11.0
sglang:e2e_request_latency_seconds_count{engine_type="unified",model_name="m"} 11.0
sglang:e2e_request_latency_seconds_sum{engine_type="unified",model_name="m"} 3.0
sglang:inter_token_latency_seconds_bucket{engine_type="unified",le="0.02",model_name="m"} 5.0
sglang:inter_token_latency_seconds_bucket{engine_type="unified",le="+Inf",model_name="m"} 6.0
sglang:time_per_output_token_seconds_bucket{engine_type="unified",le="+Inf",model_name="m"} 99.0
sglang:queue_time_seconds_bucket{engine_type="unified",le="0.1",model_name="m"} 2.0
sglang:queue_time_seconds_bucket{engine_type="unified",le="+Inf",model_name="m"} 2.0
"""


def test_sglang_newer_names() -> None:
    m = parse_metrics("sglang", SGLANG_NEWER, model="m")
    assert (m.requests_running, m.requests_waiting, m.kv_cache_usage) == (7.0, 5.0, 0.5)
    assert m.cached_prompt_tokens_total == 42.0  # summed over cache_source
    assert m.requests_total == 9.0  # num_requests_total wins over the e2e count
    assert m.tpot_seconds == Histogram(((0.02, 5.0), (INF, 6.0)), sum=0.0, count=6.0)
    assert m.queue_seconds is not None and m.queue_seconds.quantile(1.0) == 0.1


def test_block_counted_prefix_hits_are_not_read_as_tokens() -> None:
    # made up, with the HELP text of vLLM 0.7's V1 engine (counted in KV blocks)
    text = (
        "# HELP vllm:gpu_prefix_cache_hits_total GPU prefix cache hits, in terms of number of cached blocks.\n"
        "# TYPE vllm:gpu_prefix_cache_hits_total counter\n"
        'vllm:gpu_prefix_cache_hits_total{model_name="m"} 7.0\n'
    )
    assert parse_metrics("vllm", text).cached_prompt_tokens_total is None


def test_missing_metrics_give_none_fields() -> None:
    unrelated = "# TYPE python_gc_objects_collected_total counter\npython_gc_objects_collected_total 1.0\n"
    for kind in ADAPTERS:
        for text in ("", unrelated):
            m = parse_metrics(kind, text)
            assert (m.engine, m.requests_running, m.requests_waiting) == (kind, 0.0, 0.0)
            assert all(getattr(m, f) is None for f in m.__slots__[3:])


def test_nan_gauge_reads_as_absent() -> None:
    assert parse_metrics("sglang", 'sglang:token_usage{model_name="m"} NaN\n').kv_cache_usage is None


def test_round_trip_through_prometheus_client_exposition() -> None:
    registry = CollectorRegistry()
    ttft = PromHistogram(
        "vllm:time_to_first_token_seconds",
        "ttft",
        ["model_name", "engine"],
        buckets=(0.1, 0.5, 1.0),
        registry=registry,
    )
    for value in (0.05, 0.2, 0.3, 0.7, 3.0):
        ttft.labels("m", "0").observe(value)
    got = parse_metrics("vllm", generate_latest(registry).decode()).ttft_seconds
    assert got == Histogram(((0.1, 1.0), (0.5, 3.0), (1.0, 4.0), (INF, 5.0)), sum=4.25, count=5.0)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "vllm:num_requests_running{model_name=m} 1\n",  # unquoted label value
        "vllm:num_requests_running one\n",
        "# TYPE vllm:num_requests_running speedometer\nvllm:num_requests_running 1\n",
        '{model_name="m"} 1\n',
    ],
)
@pytest.mark.parametrize("kind", ["llama", "vllm", "sglang", "sim"])
def test_malformed_text_raises(kind: str, text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics(kind, text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "buckets",
    [
        '_bucket{le="1.0"} 3\n',  # no +Inf bucket
        '_bucket{le="1.0"} 3\nvllm:e2e_request_latency_seconds_bucket{le="+Inf"} 2\n',  # decreasing
        '_bucket{le="soon"} 3\n',  # le is not a number
        '_bucket{model_name="m"} 3\n',  # no le at all
    ],
)
def test_inconsistent_mapped_histogram_raises(buckets: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics("vllm", "vllm:e2e_request_latency_seconds" + buckets)


def test_unknown_engine_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown engine kind 'tgi'") as caught:
        parse_metrics("tgi", "")  # type: ignore[arg-type]
    assert not isinstance(caught.value, MetricsParseError)


# --- Histogram ---------------------------------------------------------------------------------------

EXAMPLE = Histogram(((0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (INF, 10.0)), sum=4.2, count=10.0)


def test_quantile_hand_computed() -> None:
    assert EXAMPLE.quantile(0.5) == pytest.approx(0.4)  # rank 5 in (0.1, 0.5]: 0.1 + 0.4 * 3/4
    assert EXAMPLE.quantile(0.1) == pytest.approx(0.05)  # rank 1 in (0, 0.1]: 0.1 * 1/2
    assert EXAMPLE.quantile(0.75) == pytest.approx(0.875)  # rank 7.5 in (0.5, 1]: 0.5 + 0.5 * 1.5/2
    assert EXAMPLE.quantile(0.9) == 1.0  # rank 9 in the +Inf bucket
    assert EXAMPLE.quantile(0.0) == 0.0
    assert EXAMPLE.mean == pytest.approx(0.42)
    late = Histogram(((0.1, 0.0), (0.5, 4.0), (INF, 4.0)), sum=1.0, count=4.0)
    assert late.quantile(0.0) == 0.1  # lower edge of the first non-empty bucket
    negative = Histogram(((-1.0, 2.0), (INF, 2.0)), sum=-3.0, count=2.0)
    assert negative.quantile(0.5) == -1.0


def test_quantile_of_empty_histogram_is_none() -> None:
    empty = Histogram(((0.1, 0.0), (INF, 0.0)), sum=0.0, count=0.0)
    assert empty.quantile(0.5) is None and empty.mean is None
    assert Histogram(((INF, 3.0),), sum=1.0, count=3.0).quantile(0.5) is None  # no finite bound


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_quantile_outside_zero_one_raises(q: float) -> None:
    with pytest.raises(ValueError):
        EXAMPLE.quantile(q)


def test_minus_gives_the_window() -> None:
    later = Histogram(((0.1, 5.0), (0.5, 12.0), (1.0, 15.0), (INF, 20.0)), sum=9.0, count=20.0)
    window = later.minus(EXAMPLE)
    assert window == Histogram(
        ((0.1, 3.0), (0.5, 6.0), (1.0, 7.0), (INF, 10.0)), sum=pytest.approx(4.8), count=10.0
    )
    assert window.quantile(0.5) == pytest.approx(0.1 + 0.4 * (5 - 3) / (6 - 3))


def test_minus_after_counter_reset_returns_self() -> None:
    restarted = Histogram(((0.1, 1.0), (0.5, 1.0), (1.0, 1.0), (INF, 1.0)), sum=0.05, count=1.0)
    assert restarted.minus(EXAMPLE) is restarted
    # total went up but one bucket went down: also a restart
    shifted = Histogram(((0.1, 1.0), (0.5, 9.0), (1.0, 10.0), (INF, 12.0)), sum=5.0, count=12.0)
    assert shifted.minus(EXAMPLE) is shifted
    rebucketed = Histogram(((0.2, 4.0), (INF, 30.0)), sum=9.0, count=30.0)
    assert rebucketed.minus(EXAMPLE) is rebucketed


@pytest.mark.parametrize(
    "buckets",
    [
        (),
        ((1.0, 2.0),),
        ((1.0, 2.0), (0.5, 3.0), (INF, 3.0)),
        ((1.0, 2.0), (INF, 1.0)),
        ((math.nan, 1.0), (INF, 1.0)),
    ],
)
def test_invalid_histogram_is_rejected(buckets: tuple[tuple[float, float], ...]) -> None:
    with pytest.raises(ValueError):
        Histogram(buckets, sum=0.0, count=0.0)


# --- properties --------------------------------------------------------------------------------------

bounds_st = st.lists(st.floats(0.0, 1e4, allow_nan=False), min_size=1, max_size=12, unique=True).map(sorted)


@st.composite
def increments(draw: st.DrawFn, size: int) -> list[int]:
    return draw(st.lists(st.integers(0, 1000), min_size=size, max_size=size))


def build(bounds: list[float], per_bucket: list[int]) -> Histogram:
    cumulative, running = [], 0
    for le, n in zip([*bounds, INF], per_bucket, strict=True):
        running += n
        cumulative.append((le, float(running)))
    return Histogram(tuple(cumulative), sum=float(running), count=float(running))


@st.composite
def histograms(draw: st.DrawFn) -> Histogram:
    bounds = draw(bounds_st)
    return build(bounds, draw(increments(len(bounds) + 1)))


@given(histograms(), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8))
def test_quantile_is_monotone_and_within_bounds(h: Histogram, qs: list[float]) -> None:
    values = [h.quantile(q) for q in sorted(qs)]
    if h.buckets[-1][1] == 0:
        assert values == [None] * len(values)
        return
    assert all(v is not None for v in values)
    assert values == sorted(values)
    assert all(0.0 <= v <= h.buckets[-2][0] for v in values)  # type: ignore[operator]


@given(histograms())
def test_minus_of_itself_is_empty(h: Histogram) -> None:
    empty = h.minus(h)
    assert [le for le, _ in empty.buckets] == [le for le, _ in h.buckets]
    assert all(count == 0 for _, count in empty.buckets)
    assert (empty.count, empty.sum, empty.quantile(0.5)) == (0.0, 0.0, None)


@given(bounds_st.flatmap(lambda b: st.tuples(st.just(b), increments(len(b) + 1), increments(len(b) + 1))))
def test_minus_undoes_adding_observations(case: tuple[list[float], list[int], list[int]]) -> None:
    bounds, first, more = case
    before = build(bounds, first)
    after = build(bounds, [a + b for a, b in zip(first, more, strict=True)])
    assert after.minus(before) == build(bounds, more)
