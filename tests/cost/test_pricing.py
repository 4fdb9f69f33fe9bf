"""Replica prices and per-request charges: golden values, properties, and start-up errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skyfleet.config import ConfigError, load_settings
from skyfleet.cost.pricing import PoolPrice, Pricing, TokenPrices, TokenWeights, micros_per_weighted_token

DEFAULT_WEIGHTS = TokenWeights(prefill=0.25, cached=0.025, decode=1.0)


def g5_price() -> PoolPrice:
    return PoolPrice("gpu", 1.006, micros_per_weighted_token(1.006, 130.0), DEFAULT_WEIGHTS)


def test_golden_g5_xlarge_on_demand_at_130_weighted_tokens_per_s() -> None:
    """g5.xlarge, us-east-1, on-demand: $1.006/h. At 130 weighted tokens/s one weighted token costs
    1.006e6 / (3600 * 130) = 1006000 / 468000 = 2.14957264957... micro-dollars; charges round up.

    * 1 completion token: 2.1496 -> 3;  1000 completion tokens: 2149.57 -> 2150
    * 1000 uncached prompt tokens: 0.25 * 1000 = 250 weighted -> 537.39 -> 538
    * 1000 cached prompt tokens: 0.025 * 1000 = 25 weighted -> 53.74 -> 54
    * prompt 1200 of which 200 cached, 300 completion: 250 + 5 + 300 = 555 weighted -> 1193.01 -> 1194
    * worst case of prompt 1200, max_tokens 300 (no cache hit): 300 + 300 = 600 weighted -> 1289.74 -> 1290
    """
    p = g5_price()
    assert p.micros_per_weighted_token == pytest.approx(2.1495726495726495, rel=1e-15)
    assert p.charge_micros(0, 0, 1) == 3
    assert p.charge_micros(0, 0, 1000) == 2150
    assert p.charge_micros(1000, 0, 0) == 538
    assert p.charge_micros(1000, 1000, 0) == 54
    assert p.charge_micros(1200, 200, 300) == 1194
    assert p.max_charge_micros(1200, 300) == p.charge_micros(1200, 0, 300) == 1290
    assert p.charge_micros(0, 0, 0) == 0


def test_golden_charge_of_the_default_settings() -> None:
    s = load_settings(data_dir="/nonexistent-unused")
    pricing = Pricing.from_settings(s)
    p = pricing.for_replica("local-0")
    # c6i.large default: $0.085/h at 100 weighted tokens/s -> 0.085e6/360000 = 0.23611... micros
    assert (p.pool, p.usd_per_hour) == ("local", 0.085)
    assert p.charge_micros(0, 0, 1000) == 237  # 236.11 -> 237
    assert pricing.for_model(s.local.model_name) == p
    assert pricing.pool_usd_per_hour() == {"local": pytest.approx(0.17)}


counts = st.integers(min_value=0, max_value=2_000_000)
weights = st.builds(lambda p, c, d: TokenWeights(prefill=p, cached=min(c, p), decode=d),
                    st.floats(0, 50), st.floats(0, 50), st.floats(0, 50))
gpu_prices = st.builds(lambda w, usd, tps: PoolPrice("p", usd, micros_per_weighted_token(usd, tps), w),
                       weights, st.floats(0, 200), st.floats(0.01, 1e6))
api_prices = st.builds(lambda w, a, b, c: PoolPrice("api", None, 0.0, w, TokenPrices(a, min(a, b), c)),
                       weights, st.floats(0, 500), st.floats(0, 500), st.floats(0, 500))
any_price = st.one_of(gpu_prices, api_prices)


@settings(max_examples=400, deadline=None)
@given(any_price, counts, counts, counts, st.integers(1, 10_000))
def test_charge_monotone_never_negative(p: PoolPrice, prompt: int, cached: int, completion: int, step: int) -> None:
    cached = min(cached, prompt)
    base = p.charge_micros(prompt, cached, completion)
    assert base >= 0
    assert p.charge_micros(prompt + step, cached, completion) >= base  # more prompt tokens
    assert p.charge_micros(prompt, cached, completion + step) >= base  # more completion tokens
    # a cached token replaces an uncached one: never dearer
    assert p.charge_micros(prompt, min(prompt, cached + step), completion) <= base
    # a cached token added to the prompt: never cheaper
    assert p.charge_micros(prompt + step, cached + step, completion) >= base


@settings(max_examples=400, deadline=None)
@given(any_price, counts, counts, counts, counts)
def test_max_charge_bounds_any_split(p: PoolPrice, prompt: int, max_tokens: int, cached: int, completion: int) -> None:
    worst = p.max_charge_micros(prompt, max_tokens)
    assert worst >= p.charge_micros(prompt, min(cached, prompt), min(completion, max_tokens)) >= 0


def test_api_priced_is_per_token() -> None:
    """$3 / $0.3 / $15 per million: micro-dollars per token. 1000 uncached + 500 cached + 100 out:
    3000 + 150 + 1500 = 4650 micros, exactly."""
    p = PoolPrice("api", None, 0.0, DEFAULT_WEIGHTS, TokenPrices(3.0, 0.3, 15.0))
    assert p.charge_micros(1500, 500, 100) == 4650
    assert p.charge_micros(1, 0, 0) == 3 and p.charge_micros(1, 1, 0) == 1  # 0.3 rounds up
    assert p.token_prices is not None and p.token_prices.usd(1500, 500, 100) == pytest.approx(0.00465)


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError, match="cached must not exceed prefill"):
        TokenWeights(prefill=0.1, cached=0.2, decode=1)
    with pytest.raises(ValueError, match="finite"):
        TokenWeights(prefill=-1, cached=0, decode=1)


def static(**kw: object) -> dict[str, object]:
    return {"url": "http://gpu-1:8000", "model": "llama-8b", "engine": "vllm", **kw}


def test_static_replicas_priced_from_the_catalog_with_overrides() -> None:
    s = load_settings(local={"replicas": 0}, static_replicas=[
        static(instance_type="g5.xlarge", region="us-east-1"),
        static(instance_type="g5.xlarge", region="us-east-1", tier="spot", pool="spot-pool"),
        static(instance_type="g5.xlarge", region="eu-west-1", tier="reserved", usd_per_hour=0.6),
        static(model="gpt-x", tier="api"),
    ], cost={"price_overrides": [{"instance_type": "g5.xlarge", "region": "us-east-1", "spot_usd_per_hr": 0.35}],
             "api_prices": {"gpt-x": {"prompt_usd_per_mtok": 2.5, "completion_usd_per_mtok": 10}},
             "nominal_tokens_per_s": {"static": 130}})
    pricing = Pricing.from_settings(s)
    assert [(c.replica_id, c.pool, c.tier, c.usd_per_hour) for c in pricing.replica_costs()] == [
        ("static-0", "static", "on-demand", 1.006), ("static-1", "spot-pool", "spot", 0.35),
        ("static-2", "static", "reserved", 0.6), ("static-3", "static", "api", None)]
    assert pricing.for_replica("static-0").charge_micros(0, 0, 1000) == 2150  # the golden value
    assert pricing.for_model("llama-8b") == pricing.for_replica("static-0")  # the dearest of the model
    api = pricing.for_model("gpt-x")
    assert api.usd_per_hour is None and api.charge_micros(1000, 0, 1000) == 12_500
    assert api.charge_micros(1000, 1000, 0) == 2500  # cached defaults to the prompt price


def test_unknown_instance_type_or_region_fails_with_the_known_ones() -> None:
    bad = load_settings(local={"replicas": 0}, static_replicas=[static(instance_type="g5.xlarg", region="us-east-1")])
    with pytest.raises(ConfigError, match=r"static_replicas.0: unknown instance type 'g5.xlarg'.*Known: .*g5.xlarge"):
        Pricing.from_settings(bad)
    bad = load_settings(local={"replicas": 0}, static_replicas=[static(instance_type="g5.xlarge", region="mars")])
    with pytest.raises(ConfigError, match=r"static_replicas.0: .*Known regions for it: eu-west-1, us-east-1"):
        Pricing.from_settings(bad)
    bad = load_settings(local={"replicas": 0}, static_replicas=[static(model="gpt-x", tier="api")])
    with pytest.raises(ConfigError, match=r"cost\.api_prices has no entry for model 'gpt-x'"):
        Pricing.from_settings(bad)


@pytest.mark.parametrize(("kw", "message"), [
    ({"cost": {"local_usd_per_hour": -1}}, r"cost.local_usd_per_hour: Input should be greater than or equal to 0"),
    ({"cost": {"local_usd_per_hour": "cheap"}}, r"cost.local_usd_per_hour: Input should be a valid number"),
    ({"cost": {"local_usd_per_hour": "nan"}}, r"cost.local_usd_per_hour: Input should be a finite number"),
    ({"cost": {"weights": {"prefill": 0.1, "cached": 0.5}}}, r"cached must not exceed"),
    ({"cost": {"nominal_tokens_per_s": {"local": 0}}}, r"local: must be a finite number > 0"),
    ({"cost": {"usage_flush_interval_s": 0}}, r"usage_flush_interval_s: Input should be greater than 0"),
    ({"static_replicas": [static(instance_type="g5.xlarge")]}, r"region is required with instance_type"),
    ({"static_replicas": [static(tier="reserved")]}, r"tier reserved needs usd_per_hour"),
    ({"static_replicas": [static(usd_per_hour=-0.5)]}, r"usd_per_hour: Input should be greater than or equal to 0"),
])
def test_bad_cost_settings_are_clear(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**kw)
