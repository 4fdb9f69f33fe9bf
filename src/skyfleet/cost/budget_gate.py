"""The budgets on the request path: admission (reserve), settlement (a ``RequestObserver``), alerts.

* :meth:`BudgetGate.admit` finds the budgets that apply to the caller (its tenant's and its
  key's; cached per tenant for ``budgets.cache_ttl_s``), prices the request's worst case
  (``pricing.for_model(model).max_charge_micros(prompt bound, max_tokens or the context window)``)
  and reserves it on all of them at once; a hard limit that would be passed raises the 429
  (:class:`~skyfleet.errors.BudgetExceededError`) and reserves nothing.
* The returned :class:`Reservation` rides on the request's context and record; :meth:`on_finish`
  queues its settlement (the actual charge, ``Pricing.charge_micros``: the very figure the usage
  record stores, the price of the replica that served it) and a background
  task applies queued settlements in batches, so the request path never waits for it. A request
  that never reaches the proxy is released with :meth:`cancel`.
* Settlements that cannot be applied (counters unreachable) are retried every second for
  :data:`SETTLE_RETRY_S`, then dropped and logged. On shutdown the queue is flushed. A crash loses
  the queued settlements (their spend is not counted) and leaves their reservations held until
  they expire (``budgets.reservation_ttl_s``): the budget errs on the strict side meanwhile.
* Soft limits: the backend elects one settlement per counter and period that crossed it; that one
  sends the alert (:mod:`skyfleet.cost.budget_alerts`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from skyfleet.clock import Clock, SystemClock
from skyfleet.cost.budget_alerts import Alert, AlertSender
from skyfleet.cost.budgets import (
    BudgetBackend,
    BudgetDef,
    BudgetUnavailableError,
    CounterRef,
    CounterState,
    ReserveLine,
    SettleLine,
    Settlement,
    completion_token_bound,
    period_window,
    prompt_token_bound,
    refusal,
)
from skyfleet.errors import ServiceUnavailableError, SkyfleetError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from skyfleet.config import BudgetSettings, Settings
    from skyfleet.cost.budget_store_sql import BudgetRepository
    from skyfleet.gateway.context import RequestRecord
    from skyfleet.iam.principal import Principal

log = logging.getLogger("skyfleet.budgets")

#: How long a batch of settlements is retried while the counters are unreachable.
SETTLE_RETRY_S = 120.0
#: Tenants whose budget list is cached at once (the cache is cleared when it grows past this).
CACHE_MAX = 10_000


class PriceOf(Protocol):
    """What the gate needs of a pool's price (``cost.pricing.PoolPrice``): the admission bound."""

    def max_charge_micros(self, prompt_tokens: int, max_tokens: int) -> int: ...


class Prices(Protocol):
    """``cost.pricing.Pricing``: the gateway's ``gw.pricing``."""

    def for_model(self, model: str) -> PriceOf: ...

    def charge_micros(self, model: str, replica_id: str | None, prompt_tokens: int, cached_tokens: int,
                      completion_tokens: int) -> int: ...


@dataclass(slots=True)
class Reservation:
    """One request's reservation on its budgets (a handle, not data: never logged)."""

    id: str
    budgets: tuple[BudgetDef, ...]
    counters: tuple[CounterRef, ...]
    amount: int
    released: bool = field(default=False, repr=False)

    def take(self) -> bool:
        """True the first time (the reservation is still to release), False afterwards."""
        first = not self.released
        self.released = True
        return first


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    budget: BudgetDef
    period_start: datetime
    period_end: datetime | None
    state: CounterState


class BudgetGate:
    def __init__(self, *, definitions: BudgetRepository | None, backend: BudgetBackend | None,
                 pricing: Prices | None, settings: BudgetSettings, clock: Clock | None = None,
                 alerts: AlertSender | None = None, registry: CollectorRegistry | None = None) -> None:
        self.definitions = definitions
        self.backend = backend
        self._pricing = pricing
        self._settings = settings
        self._clock = clock or SystemClock()
        self.alerts = alerts or AlertSender(None, timeout_s=settings.webhook_timeout_s, retries=0)
        self._cache: dict[str, tuple[float, tuple[BudgetDef, ...]]] = {}
        self._loading: dict[str, asyncio.Future[tuple[BudgetDef, ...]]] = {}
        self._queue: list[tuple[Settlement, tuple[BudgetDef, ...]]] = []
        self._applying = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0
        self._refused = self._unavailable = None
        if registry is not None:
            from prometheus_client import Counter

            self._refused = Counter("skyfleet_budget_refused_requests", "Requests refused by a hard budget "
                                    "(429 budget_exceeded).", ["scope", "period"], registry=registry)
            self._unavailable = Counter("skyfleet_budget_unavailable", "Requests decided without the budget "
                                        "counters (unreachable), by the on_error policy applied.", ["policy"],
                                        registry=registry)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def disabled(cls) -> BudgetGate:
        """No budgets at all (tests and tools that build a Gateway by hand)."""
        from skyfleet.config import BudgetSettings

        return cls(definitions=None, backend=None, pricing=None, settings=BudgetSettings())

    @classmethod
    def from_settings(cls, settings: Settings, engine: Any, pricing: Prices, clock: Clock,
                      registry: CollectorRegistry | None = None) -> BudgetGate:
        from skyfleet.cost.budget_store_sql import BudgetRepository

        b = settings.budgets
        alerts = AlertSender(b.webhook_url.get_secret_value() if b.webhook_url else None,
                             timeout_s=b.webhook_timeout_s, retries=b.webhook_retries)
        return cls(definitions=BudgetRepository(engine), backend=open_backend(settings, engine), pricing=pricing,
                   settings=b, clock=clock, alerts=alerts, registry=registry)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)

    # -- which budgets apply ----------------------------------------------------------------------
    def invalidate(self, tenant_id: str | None = None) -> None:
        """Forget cached budget lists (one tenant's, or all): a change made here applies at once."""
        if tenant_id is None:
            self._cache.clear()
        else:
            self._cache.pop(tenant_id, None)

    async def budgets_of(self, tenant_id: str) -> tuple[BudgetDef, ...]:
        """The tenant's budgets (its own and its keys'), cached for ``cache_ttl_s``."""
        if self.definitions is None:
            return ()
        now = self._clock.now()
        hit = self._cache.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._loading.get(tenant_id)
        if pending is None:
            pending = asyncio.ensure_future(self.definitions.for_tenant(tenant_id))
            self._loading[tenant_id] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(tenant_id, None))
        found = await asyncio.shield(pending)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[tenant_id] = (now + self._settings.cache_ttl_s, found)
        return found

    # -- admission --------------------------------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> None:
        policy = self._settings.on_error
        if self._unavailable is not None:
            self._unavailable.labels(policy).inc()
        log.warning("budget counters unreachable", extra={"error_type": type(exc).__name__, "policy": policy})
        if policy == "deny":
            raise ServiceUnavailableError("Budgets cannot be checked right now; try again shortly.",
                                          code="budget_unavailable", retry_after_s=1) from None

    async def admit(self, principal: Principal, model: str, *, prompt_tokens: int, max_tokens: int | None,
                    context_window: int | None) -> Reservation | None:
        """Reserve the request's worst-case cost on every budget that applies, or raise the 429.

        None: no budget applies (or the counters are unreachable and ``on_error`` is allow).
        """
        if self.backend is None or self._pricing is None:
            return None
        try:
            budgets = tuple(b for b in await self.budgets_of(principal.tenant_id)
                            if b.applies_to(principal.tenant_id, principal.key_id))
        except SkyfleetError as exc:  # the store is unreachable
            self._unreachable(exc)
            return None
        if not budgets:
            return None
        completion = completion_token_bound(max_tokens, context_window, self._settings.unknown_context_window)
        amount = int(self._pricing.for_model(model).max_charge_micros(prompt_tokens, completion))
        now = self._now()
        lines = []
        for b in budgets:
            start, end = period_window(b.period, now)
            lines.append(ReserveLine(CounterRef(b.id, b.tenant_id, start), amount, b.hard_limit_usd_micros, end))
        reservation = Reservation("rsv_" + secrets.token_hex(10), budgets, tuple(ln.counter for ln in lines), amount)
        try:
            refused = await self.backend.reserve(
                lines, reservation.id, now=now, expires_at=now + timedelta(seconds=self._settings.reservation_ttl_s))
        except BudgetUnavailableError as exc:
            self._unreachable(exc)
            return None
        if refused is None:
            return reservation
        raise await self._refusal(budgets[refused], lines[refused], amount, now)

    async def _refusal(self, budget: BudgetDef, line: ReserveLine, amount: int, now: datetime) -> SkyfleetError:
        if self._refused is not None:
            self._refused.labels(budget.scope, budget.period).inc()
        state: CounterState | None = None
        hard = budget.hard_limit_usd_micros
        try:
            if self.definitions is not None:  # the limit that refused may be newer than the cached one
                hard = (await self.definitions.get(budget.id)).hard_limit_usd_micros
            state = (await self.backend.state([line.counter], now=now)).get(line.counter) if self.backend else None
        except (SkyfleetError, BudgetUnavailableError):
            pass
        return refusal(budget, hard_limit=hard if hard is not None else 0, state=state or CounterState(0, 0),
                       amount=amount, now=now)

    async def admit_payload(self, principal: Principal, model: str, payload: dict[str, Any], max_tokens: int | None,
                            context_window: int | None) -> Reservation | None:
        """:meth:`admit` for a chat or completion body (its prompt bounded by :func:`prompt_token_bound`)."""
        if self.backend is None:
            return None
        return await self.admit(principal, model, prompt_tokens=prompt_token_bound(payload), max_tokens=max_tokens,
                                context_window=context_window)

    def cancel(self, reservation: Reservation | None) -> None:
        """The request ended before an engine saw it (no record follows): release, charge nothing."""
        if reservation is not None and reservation.take():
            self._enqueue(reservation, 0)

    # -- settlement -------------------------------------------------------------------------------
    def _charge(self, record: RequestRecord) -> int:
        """What the request is charged: exactly the usage record's charge (``Pricing.charge_micros``)."""
        if self._pricing is None:
            return 0
        return int(self._pricing.charge_micros(record.model, record.replica_id, record.prompt_tokens,
                                               record.cached_tokens, record.completion_tokens))

    def on_finish(self, record: RequestRecord) -> None:
        """Queue the settlement of the record's reservation (never blocks; applied in the background)."""
        reservation = getattr(record, "reservation", None)
        if not isinstance(reservation, Reservation):
            return
        try:
            actual = self._charge(record)
        except Exception as exc:  # noqa: BLE001 - a price lookup must not break the request path
            log.warning("budget charge failed", extra={"error_type": type(exc).__name__})
            actual = 0
        first = reservation.take()
        if first or actual:
            self._enqueue(reservation, actual)

    def _enqueue(self, r: Reservation, actual: int) -> None:
        lines = tuple(SettleLine(c, b.soft_limit_usd_micros) for c, b in zip(r.counters, r.budgets, strict=True))
        self._queue.append((Settlement(r.id, lines, actual), r.budgets))
        self._wake.set()

    @property
    def pending(self) -> int:
        """Settlements queued or being applied."""
        return len(self._queue) + self._applying

    async def flush(self) -> bool:
        """Apply every queued settlement (one backend call); False if the counters were unreachable
        (the batch is back at the head of the queue)."""
        batch, self._queue = self._queue, []
        if not batch or self.backend is None:
            return True
        self._applying += len(batch)
        try:
            crossings = await self.backend.settle([s for s, _ in batch], now=self._now())
        except BudgetUnavailableError as exc:
            self._queue[:0] = batch
            log.warning("budget settlement deferred", extra={"error_type": type(exc).__name__,
                                                              "settlements": len(batch)})
            return False
        finally:
            self._applying -= len(batch)
        if crossings:
            by_id = {b.id: b for _, budgets in batch for b in budgets}
            now = self._now()
            for c in crossings:
                budget = by_id.get(c.counter.budget_id)
                if budget is not None:
                    self.alerts.send(Alert(budget, c.counter.period_start, c.spent, c.soft_limit, now))
        return True

    async def _settle_forever(self) -> None:
        failing_since: float | None = None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if await self.flush():
                failing_since = None
                continue
            now = self._clock.now()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since > SETTLE_RETRY_S:
                self.dropped += len(self._queue)
                log.error("budget settlements dropped: counters unreachable", extra={"settlements": len(self._queue)})
                self._queue.clear()
                failing_since = None
                continue
            await asyncio.sleep(1.0)  # retry backoff while the counters are unreachable
            self._wake.set()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_interval_s)
            try:
                released = await self.backend.release_expired(now=self._now()) if self.backend else 0
            except BudgetUnavailableError as exc:
                log.warning("budget reservation sweep failed", extra={"error_type": type(exc).__name__})
                continue
            if released:
                log.info("expired budget reservations released", extra={"reservations": released})

    # -- reading ---------------------------------------------------------------------------------
    async def status(self, budgets: Sequence[BudgetDef]) -> dict[str, BudgetStatus]:
        """Spend and reservations of each budget's current window (budget id -> status)."""
        now = self._now()
        windows = {b.id: period_window(b.period, now) for b in budgets}
        counters = {b.id: CounterRef(b.id, b.tenant_id, windows[b.id][0]) for b in budgets}
        states = await self.backend.state(list(counters.values()), now=now) if self.backend and budgets else {}
        return {b.id: BudgetStatus(b, windows[b.id][0], windows[b.id][1], states.get(counters[b.id],
                                                                                      CounterState(0, 0)))
                for b in budgets}

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.backend is None:
            return
        await self.backend.start()
        self._tasks = [asyncio.create_task(self._settle_forever(), name="budget-settle"),
                       asyncio.create_task(self._sweep_forever(), name="budget-sweep")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for _ in range(3):  # the last settlements, before the counters close
            if await self.flush():
                break
        if self._queue:
            log.error("budget settlements lost at shutdown", extra={"settlements": len(self._queue)})
        await self.alerts.close()
        if self.backend is not None:
            await self.backend.close()


def open_backend(settings: Settings, engine: Any) -> BudgetBackend:
    """The counters ``budgets.backend`` names (auto: Redis when ``redis_url`` is set, else the store)."""
    from skyfleet.config import ConfigError

    kind = settings.budgets.backend
    if kind == "auto":
        kind = "redis" if settings.redis_url is not None else "database"
    if kind == "redis":
        if settings.redis_url is None:
            raise ConfigError("budgets.backend is 'redis' but redis_url is not set")
        from skyfleet.cost.budget_store_redis import RedisBudgetCounters

        return RedisBudgetCounters(settings.redis_url.get_secret_value(), prefix=settings.budgets.redis_prefix,
                                   timeout_s=settings.budgets.redis_timeout_s,
                                   ttl_s=settings.budgets.reservation_ttl_s)
    from skyfleet.cost.budget_store_sql import SqlBudgetCounters

    return SqlBudgetCounters(engine)
