"""Prices: what a replica costs per hour, and what one request is charged.

Every replica has a capacity tier and a $/hour (:class:`ReplicaCost`): local replicas (tier
``local``) cost ``cost.local_usd_per_hour``; a static replica is looked up in the instance catalog
by ``instance_type`` and ``region`` (tier ``on-demand`` or ``spot``; ``reserved`` takes its own
``usd_per_hour``), with ``cost.price_overrides`` applied; tier ``api`` upstreams charge per token
(``cost.api_prices``, by model) and have no hourly cost. Unknown types or regions fail start-up
with the known ones listed (:class:`~skyfleet.config.ConfigError`).

A request is *charged* at settlement (and its worst case *reserved* at admission) at the price of
one weighted token: ``usd_per_hour * 1e6 / (3600 * nominal weighted tokens/s of the pool)``
micro-dollars, where a request's weighted tokens are ``prefill * uncached prompt + cached *
cached prompt + decode * completion`` (:class:`TokenWeights`). Charges are integers, rounded up,
computed exactly: weights and per-token API prices are used to 6 decimal places (as integers),
so a charge never decreases when a token count grows, and the worst case at admission is never
below the charge at settlement. See docs/cost.md for the difference between charged and
attributed cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from skyfleet.config import ConfigError

if TYPE_CHECKING:
    from skyfleet.config import Settings, StaticReplica
    from skyfleet.cost.catalog import Catalog, InstanceType

log = logging.getLogger("skyfleet.cost")

_SCALE = 1_000_000  # weights and API prices are used to 6 decimal places


def _fixed(x: float) -> int:
    return round(x * _SCALE)


@dataclass(frozen=True, slots=True)
class TokenWeights:
    """Attribution and charging weights, from settings (``cost.weights``; defaults in docs/cost.md).

    ``prompt_tokens`` counts every prompt token, cached ones included (the OpenAI convention:
    ``usage.prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``).
    """

    prefill: float  # per uncached prompt token
    cached: float  # per cached prompt token
    decode: float  # per completion token
    _fixed: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("prefill", "cached", "decode"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"token weight {name} must be a finite number >= 0")
        if self.cached > self.prefill:
            raise ValueError("token weight cached must not exceed prefill (a cache hit never costs more)")
        object.__setattr__(self, "_fixed", (_fixed(self.prefill), _fixed(self.cached), _fixed(self.decode)))

    def weighted(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        uncached, cached, completion = _split(prompt_tokens, cached_tokens, completion_tokens)
        return self.prefill * uncached + self.cached * cached + self.decode * completion

    def weighted_fixed(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """:meth:`weighted` x 1e6, exactly (weights to 6 decimal places)."""
        uncached, cached, completion = _split(prompt_tokens, cached_tokens, completion_tokens)
        p, c, d = self._fixed
        return p * uncached + c * cached + d * completion


def _split(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> tuple[int, int, int]:
    prompt = max(0, int(prompt_tokens))
    cached = min(max(0, int(cached_tokens)), prompt)
    return prompt - cached, cached, max(0, int(completion_tokens))


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """Per-token prices of an API-priced upstream, in USD per million tokens (= micro-dollars per token)."""

    prompt_usd_per_mtok: float
    cached_usd_per_mtok: float
    completion_usd_per_mtok: float

    def charge_micros(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        uncached, cached, completion = _split(prompt_tokens, cached_tokens, completion_tokens)
        # The prices, in micro-dollars per token, to 6 decimals, as integers: exact sums.
        total = (_fixed(self.prompt_usd_per_mtok) * uncached + _fixed(self.cached_usd_per_mtok) * cached
                 + _fixed(self.completion_usd_per_mtok) * completion)
        return -(-total // _SCALE)

    def usd(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        uncached, cached, completion = _split(prompt_tokens, cached_tokens, completion_tokens)
        return (self.prompt_usd_per_mtok * uncached + self.cached_usd_per_mtok * cached
                + self.completion_usd_per_mtok * completion) / 1e6


@dataclass(frozen=True, slots=True)
class PoolPrice:
    """What one token costs in a pool, for charging at settlement and reserving at admission."""

    pool: str
    usd_per_hour: float | None  # per replica; None for API-priced pools
    micros_per_weighted_token: float  # GPU pools: usd_per_hour*1e6 / (3600 * nominal weighted tokens/s)
    weights: TokenWeights = field(default_factory=lambda: TokenWeights(1.0, 1.0, 1.0))
    #: API-priced pools: the per-token table (then ``micros_per_weighted_token`` is unused).
    token_prices: TokenPrices | None = None

    def charge_micros(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """The charge in micro-dollars, rounded up; never negative."""
        if self.token_prices is not None:
            return self.token_prices.charge_micros(prompt_tokens, cached_tokens, completion_tokens)
        fixed = self.weights.weighted_fixed(prompt_tokens, cached_tokens, completion_tokens)
        if fixed == 0 or self.micros_per_weighted_token <= 0:
            return 0
        return max(0, math.ceil(fixed * self.micros_per_weighted_token / _SCALE))

    def max_charge_micros(self, prompt_tokens: int, max_tokens: int) -> int:
        """The worst case: no cache hit, ``max_tokens`` completion tokens (>= any :meth:`charge_micros`)."""
        return self.charge_micros(prompt_tokens, 0, max_tokens)


@dataclass(frozen=True, slots=True)
class ReplicaCost:
    """A replica's place in the price list (also what a replica interval records)."""

    replica_id: str
    pool: str
    model: str
    tier: str  # local | on-demand | spot | reserved | api
    usd_per_hour: float | None  # None: API-priced (per token)
    instance_type: str | None = None
    region: str | None = None
    engine: str = ""


def micros_per_weighted_token(usd_per_hour: float, weighted_tokens_per_s: float) -> float:
    return usd_per_hour * 1e6 / (3600.0 * weighted_tokens_per_s)


class Pricing:
    """Built once from the settings and the catalog; held by the Gateway as ``gw.pricing``."""

    def __init__(self, costs: Iterable[ReplicaCost], *, weights: TokenWeights,
                 nominal_tokens_per_s: Mapping[str, float], default_tokens_per_s: float,
                 api_prices: Mapping[str, TokenPrices] | None = None) -> None:
        self.weights = weights
        self._nominal = dict(nominal_tokens_per_s)
        self._default_tps = default_tokens_per_s
        self._api = dict(api_prices or {})
        self._costs: dict[str, ReplicaCost] = {}
        self._by_replica: dict[str, PoolPrice] = {}
        self._by_model: dict[str, PoolPrice] = {}
        for c in costs:
            self.add(c)

    def add(self, cost: ReplicaCost) -> PoolPrice:
        """Register (or re-price) a replica; returns its price."""
        price = self._price(cost)
        self._costs[cost.replica_id] = cost
        self._by_replica[cost.replica_id] = price
        current = self._by_model.get(cost.model)
        # A model served by differently priced replicas is reserved and charged-before-routing at the dearest.
        if current is None or _dearer(price, current):
            self._by_model[cost.model] = price
        return price

    def _price(self, cost: ReplicaCost) -> PoolPrice:
        if cost.usd_per_hour is None:
            table = self._api.get(cost.model)
            if table is None:
                raise ConfigError(f"replica {cost.replica_id} is API-priced but cost.api_prices has no entry "
                                  f"for model '{cost.model}'")
            return PoolPrice(cost.pool, None, 0.0, self.weights, table)
        tps = self.nominal_tokens_per_s(cost.pool)
        return PoolPrice(cost.pool, cost.usd_per_hour, micros_per_weighted_token(cost.usd_per_hour, tps),
                         self.weights)

    def nominal_tokens_per_s(self, pool: str) -> float:
        return self._nominal.get(pool, self._default_tps)

    def for_model(self, model: str) -> PoolPrice:
        """The price a request for this model is charged/reserved at (the dearest replica serving it).

        A model no replica serves gets the dearest price of all (conservative for reservations).
        """
        found = self._by_model.get(model)
        if found is not None:
            return found
        api = self._api.get(model)
        if api is not None:
            return PoolPrice("api", None, 0.0, self.weights, api)
        dearest = None
        for price in self._by_model.values():
            if dearest is None or _dearer(price, dearest):
                dearest = price
        return dearest or PoolPrice("none", 0.0, 0.0, self.weights)

    def for_replica(self, replica_id: str) -> PoolPrice:
        found = self._by_replica.get(replica_id)
        if found is None:
            raise KeyError(replica_id)
        return found

    def price_of(self, model: str, replica_id: str | None) -> PoolPrice:
        """The price a finished request is charged at: its replica's, else (never routed) its model's."""
        if replica_id is not None:
            found = self._by_replica.get(replica_id)
            if found is not None:
                return found
        return self.for_model(model)

    def charge_micros(self, model: str, replica_id: str | None, prompt_tokens: int, cached_tokens: int,
                      completion_tokens: int) -> int:
        """What a finished request is charged (usage records and budget settlement use this)."""
        if not (prompt_tokens or completion_tokens):
            return 0
        return self.price_of(model, replica_id).charge_micros(prompt_tokens, cached_tokens, completion_tokens)

    def replica_cost(self, replica_id: str) -> ReplicaCost:
        return self._costs[replica_id]

    def replica_costs(self) -> list[ReplicaCost]:
        return list(self._costs.values())

    def pool_usd_per_hour(self) -> dict[str, float]:
        """Sum of the hourly prices of the known replicas, per pool (API-priced pools: 0)."""
        out: dict[str, float] = {}
        for c in self._costs.values():
            out[c.pool] = out.get(c.pool, 0.0) + (c.usd_per_hour or 0.0)
        return out

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog | None = None) -> Pricing:
        """Price every configured replica; :class:`ConfigError` for an unknown instance type or region."""
        return cls(replica_costs(settings, catalog), weights=token_weights(settings),
                   nominal_tokens_per_s=settings.cost.nominal_tokens_per_s,
                   default_tokens_per_s=settings.cost.default_nominal_tokens_per_s,
                   api_prices=api_prices(settings))


def _dearer(a: PoolPrice, b: PoolPrice) -> bool:
    probe = (1000, 0, 1000)
    return a.charge_micros(*probe) > b.charge_micros(*probe)


def token_weights(settings: Settings) -> TokenWeights:
    w = settings.cost.weights
    return TokenWeights(prefill=w.prefill, cached=w.cached, decode=w.decode)


def api_prices(settings: Settings) -> dict[str, TokenPrices]:
    return {model: TokenPrices(p.prompt_usd_per_mtok,
                               p.prompt_usd_per_mtok if p.cached_usd_per_mtok is None else p.cached_usd_per_mtok,
                               p.completion_usd_per_mtok)
            for model, p in settings.cost.api_prices.items()}


def replica_costs(settings: Settings, catalog: Catalog | None = None) -> list[ReplicaCost]:
    """The cost of each replica the settings describe (ids as the providers name them)."""
    from skyfleet.cost.catalog import Catalog, PriceOverride

    out = [ReplicaCost(replica_id=f"local-{i}", pool="local", model=settings.local.model_name, tier="local",
                       usd_per_hour=settings.cost.local_usd_per_hour, engine=settings.local.kind)
           for i in range(settings.local.replicas)]
    if not settings.static_replicas:
        return out
    cat = catalog if catalog is not None else Catalog.builtin()
    overrides = [PriceOverride(o.instance_type, o.region, o.ondemand_usd_per_hr, o.spot_usd_per_hr)
                 for o in settings.cost.price_overrides]
    try:
        cat = cat.with_overrides(overrides)
    except ConfigError as exc:
        raise ConfigError(f"cost.price_overrides: {exc}") from None
    for i, r in enumerate(settings.static_replicas):
        out.append(static_replica_cost(i, r, cat))
    return out


def static_replica_cost(index: int, replica: StaticReplica, catalog: Catalog) -> ReplicaCost:
    rid = f"static-{index}"
    pool = replica.pool or "static"
    base = {"replica_id": rid, "pool": pool, "model": replica.model, "tier": replica.tier,
            "instance_type": replica.instance_type, "region": replica.region, "engine": replica.engine}
    if replica.tier == "api":
        return ReplicaCost(**base, usd_per_hour=None)  # type: ignore[arg-type]
    if replica.usd_per_hour is not None:
        if replica.instance_type is not None:
            _lookup(index, replica.instance_type, replica.region or "", catalog)  # still a known type
        return ReplicaCost(**base, usd_per_hour=replica.usd_per_hour)  # type: ignore[arg-type]
    if replica.instance_type is None:
        log.warning("static replica has no instance_type or usd_per_hour: its cost is counted as 0",
                    extra={"replica_id": rid})
        return ReplicaCost(**base, usd_per_hour=0.0)  # type: ignore[arg-type]
    it = _lookup(index, replica.instance_type, replica.region or "", catalog)
    if replica.tier == "spot":
        if it.spot_usd_per_hr is None:
            raise ConfigError(f"static_replicas.{index}: the catalog has no spot price for {it.name} in "
                              f"{it.region}; set usd_per_hour or a cost.price_overrides entry")
        usd = it.spot_usd_per_hr
    else:
        usd = it.ondemand_usd_per_hr
    return ReplicaCost(**base, usd_per_hour=usd)  # type: ignore[arg-type]


def _lookup(index: int, name: str, region: str, catalog: Catalog) -> InstanceType:
    try:
        return catalog.get(name, region)
    except ConfigError as exc:
        raise ConfigError(f"static_replicas.{index}: {exc}") from None
