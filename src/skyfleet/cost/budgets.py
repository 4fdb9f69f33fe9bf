"""Budgets: the pure parts (periods, money, the admission estimate, refusals) and the backend Protocol.

A budget caps what a tenant, or one API key, may spend per period: ``daily`` and ``monthly`` are
UTC calendar windows, ``total`` never resets. A soft limit raises one alert per period (a log
line and an optional webhook); a hard limit refuses requests with a 429 ``budget_exceeded``.

Money is integer micro-dollars everywhere (``*_usd_micros``); the admin API and the CLI take and
show dollars as decimal strings (:func:`parse_usd`, :func:`format_usd`).

Admission reserves a request's maximum possible cost on every budget that applies, all or none,
atomically (:class:`BudgetBackend.reserve`); settlement moves the actual charge into ``spent`` and
releases the reservation. So ``spent + reserved`` never passes a hard limit at admission, and
``spent`` exceeds it only by what requests cost beyond their reservation (never, while the
estimate below is an upper bound). The request path lives in :mod:`skyfleet.cost.budget_gate`;
backends in :mod:`skyfleet.cost.budget_store_sql` (PostgreSQL, SQLite) and
:mod:`skyfleet.cost.budget_store_redis`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol

from skyfleet.errors import BudgetExceededError

Period = Literal["daily", "monthly", "total"]
PERIODS: tuple[Period, ...] = ("daily", "monthly", "total")
#: The start of the one window of a ``total`` budget.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROS_PER_USD = 1_000_000
#: Largest amount a budget takes: $1e9 (1e15 micro-dollars stays exact in a double, as Redis' Lua needs).
MAX_USD_MICROS = 10**15
#: Per-message allowance (chat template tokens: role markers, separators) in the prompt bound.
MESSAGE_OVERHEAD_TOKENS = 8
#: Allowance for the template around the whole prompt (begin/end of text, generation prompt).
PROMPT_OVERHEAD_TOKENS = 16


class BudgetUnavailableError(Exception):
    """The budget counters could not be reached (the message names the error type only)."""


# -- periods -------------------------------------------------------------------------------------


def period_window(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """The UTC window ``[start, end)`` of ``period`` that holds ``now``; ``end`` is None for ``total``.

    ``now`` must be timezone-aware (any zone: it is converted to UTC first).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    now = now.astimezone(UTC)
    if period == "daily":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "monthly":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    if period == "total":
        return EPOCH, None
    raise ValueError(f"unknown period {str(period)[:32]!r}; use one of: {', '.join(PERIODS)}")


def check_period(value: object) -> Period:
    if value not in PERIODS:
        raise ValueError(f"unknown period {str(value)[:32]!r}; use one of: {', '.join(PERIODS)}")
    return value  # type: ignore[return-value]


# -- money ---------------------------------------------------------------------------------------


#: Dollars as text: digits, optionally a point and 1 to 6 decimals (what the OpenAPI schema states).
_USD_TEXT = re.compile(r"\d{1,10}(\.\d{1,6})?", re.ASCII)


def parse_usd(value: object) -> int:
    """Dollars (a decimal string or a JSON number) -> micro-dollars; ValueError says what is wrong.

    Non-negative, finite, at most 6 decimals, at most $1e9. Booleans are not numbers here.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError("must be an amount in dollars, e.g. \"12.50\" or 12.5")
    text = value.strip() if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str) and (not text or len(text) > 40 or "_" in text):
        raise ValueError("must be an amount in dollars, e.g. \"12.50\" or 12.5")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError("must be an amount in dollars, e.g. \"12.50\" or 12.5") from None
    if not amount.is_finite():
        raise ValueError("must be a finite amount (not NaN or infinity)")
    if amount < 0:
        raise ValueError("must not be negative")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError("has more than 6 decimals (the smallest unit is $0.000001)")
    if micros > MAX_USD_MICROS:
        raise ValueError(f"is larger than the maximum, ${MAX_USD_MICROS // MICROS_PER_USD}")
    if isinstance(value, str) and _USD_TEXT.fullmatch(text) is None:
        raise ValueError("must be written as digits with an optional decimal point, e.g. \"12.50\"")
    return int(micros)


def format_usd(micros: int) -> str:
    """Micro-dollars -> a decimal string with at least 2 decimals: 1500000 -> "1.50", 12 -> "0.000012"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(int(micros)), MICROS_PER_USD)
    digits = f"{frac:06d}".rstrip("0")
    return f"{sign}{whole}.{digits.ljust(2, '0')}"


# -- the admission estimate ----------------------------------------------------------------------


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, Mapping):
        return sum(_text_bytes(v) for k, v in value.items() if k not in ("type", "role", "name"))
    if isinstance(value, list | tuple):
        return sum(_text_bytes(v) for v in value)
    return 0


def prompt_token_bound(payload: Mapping[str, Any]) -> int:
    """An upper bound of a chat or completion request's prompt tokens, from its JSON body.

    Byte-level BPE and SentencePiece-with-byte-fallback tokenizers never produce more tokens than
    the text has UTF-8 bytes; chat templates add a few special tokens per message, counted as
    :data:`MESSAGE_OVERHEAD_TOKENS` each plus :data:`PROMPT_OVERHEAD_TOKENS`. A prompt given as
    token ids counts exactly. Reserving on this bound keeps settlement within the reservation.
    """
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt) + PROMPT_OVERHEAD_TOKENS
    messages = payload.get("messages")
    total = PROMPT_OVERHEAD_TOKENS + _text_bytes(prompt)
    if isinstance(messages, list):
        total += sum(MESSAGE_OVERHEAD_TOKENS + _text_bytes(m) for m in messages)
    return total


def completion_token_bound(max_tokens: int | None, context_window: int | None, fallback_window: int) -> int:
    """What a request may generate at most: ``max_tokens``, else its model's whole context window.

    Without ``max_tokens`` an engine generates until the context is full; the window less the
    actual prompt is unknown before the engine counts it, so the whole window is the safe bound.
    """
    if max_tokens is not None:
        return max(0, int(max_tokens))
    return int(context_window or fallback_window)


# -- definitions, counters, reservations ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetDef:
    """One budget as stored (``key_id`` None: the whole tenant's)."""

    id: str
    tenant_id: str
    key_id: str | None
    period: Period
    soft_limit_usd_micros: int | None
    hard_limit_usd_micros: int | None
    created_at: datetime
    updated_at: datetime

    @property
    def scope(self) -> Literal["tenant", "key"]:
        return "tenant" if self.key_id is None else "key"

    def applies_to(self, tenant_id: str, key_id: str) -> bool:
        return self.tenant_id == tenant_id and (self.key_id is None or self.key_id == key_id)


@dataclass(frozen=True, slots=True)
class CounterRef:
    """One budget's counter for one period window."""

    budget_id: str
    tenant_id: str
    period_start: datetime


@dataclass(frozen=True, slots=True)
class ReserveLine:
    """Reserve ``amount`` on ``counter`` unless that passes ``hard_limit`` (None: no hard limit)."""

    counter: CounterRef
    amount: int
    hard_limit: int | None
    #: When the counter's window ends (None: never); backends may forget a counter some time after.
    period_end: datetime | None


@dataclass(frozen=True, slots=True)
class SettleLine:
    counter: CounterRef
    #: The soft limit to alert on once ``spent`` reaches it (None: none). SQL backends read the
    #: budget's current one instead.
    soft_limit: int | None


@dataclass(frozen=True, slots=True)
class Settlement:
    """Release reservation ``reservation_id`` on every line's counter and add ``actual`` to spent."""

    reservation_id: str
    lines: tuple[SettleLine, ...]
    actual: int


@dataclass(frozen=True, slots=True)
class Crossing:
    """A counter whose spend reached its soft limit for the first time this period."""

    counter: CounterRef
    spent: int
    soft_limit: int | None


@dataclass(frozen=True, slots=True)
class CounterState:
    spent: int
    reserved: int


class BudgetBackend(Protocol):
    """Where the counters live. Every method raises :class:`BudgetUnavailableError` when unreachable."""

    async def reserve(self, lines: Sequence[ReserveLine], reservation_id: str, *, now: datetime,
                      expires_at: datetime) -> int | None:
        """Reserve every line or none, atomically: None when all were reserved, else the index of a
        line whose hard limit refused (``spent + reserved + amount > hard_limit``)."""
        ...

    async def settle(self, settlements: Sequence[Settlement], *, now: datetime) -> list[Crossing]:
        """Apply settlements (each reservation released at most once, even after it expired);
        return the soft limits crossed (each counter at most once per period, across gateways)."""
        ...

    async def release_expired(self, *, now: datetime) -> int:
        """Release reservations past their expiry (a crashed gateway's); return how many."""
        ...

    async def state(self, counters: Sequence[CounterRef], *, now: datetime) -> dict[CounterRef, CounterState]:
        """Current spent and reserved of each counter (absent: nothing spent yet)."""
        ...

    async def forget(self, budget: BudgetDef) -> None:
        """Drop a deleted budget's counters (SQL: the foreign key cascades)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


# -- the refusal ---------------------------------------------------------------------------------


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal(budget: BudgetDef, *, hard_limit: int, state: CounterState | None, amount: int,
            now: datetime) -> BudgetExceededError:
    """The 429 for ``budget``: which budget (scope, period, id), its numbers, when it resets.

    Only the caller's own budget is named: never another tenant's data.
    """
    _, end = period_window(budget.period, now)
    who = "tenant" if budget.key_id is None else "API key"
    used = ""
    if state is not None:
        used = f" Spent ${format_usd(state.spent)}, reserved by requests in flight ${format_usd(state.reserved)};"
    message = (f"This {who}'s {budget.period} budget ({budget.id}) is exhausted: hard limit "
               f"${format_usd(hard_limit)}.{used} this request may cost up to ${format_usd(amount)}. ")
    headers = {"x-should-retry": "false"}
    if end is None:
        message += "A total budget does not reset; an administrator can raise it."
    else:
        message += f"It resets at {_when(end)}."
        headers["Retry-After"] = str(max(1, math.ceil((end - now).total_seconds())))
    return BudgetExceededError(message, headers=headers)


class MemoryBudgetCounters:
    """A :class:`BudgetBackend` in this process's memory: the reference model the shared backends
    are tested against, and enough for tools and tests that run one gateway without a store.

    Every method runs without an ``await`` in between reads and writes, so each is atomic on the loop.
    """

    def __init__(self) -> None:
        #: counter -> [spent, reserved, alerted (0/1)]
        self.counters: dict[CounterRef, list[int]] = {}
        #: (reservation id, budget id) -> (counter, amount, expires_at)
        self.reservations: dict[tuple[str, str], tuple[CounterRef, int, datetime]] = {}

    async def reserve(self, lines: Sequence[ReserveLine], reservation_id: str, *, now: datetime,
                      expires_at: datetime) -> int | None:
        for i, line in enumerate(lines):
            spent, reserved, _ = self.counters.get(line.counter, (0, 0, 0))
            if line.hard_limit is not None and spent + reserved + line.amount > line.hard_limit:
                return i
        for line in lines:
            self.counters.setdefault(line.counter, [0, 0, 0])[1] += line.amount
            self.reservations[(reservation_id, line.counter.budget_id)] = (line.counter, line.amount, expires_at)
        return None

    async def settle(self, settlements: Sequence[Settlement], *, now: datetime) -> list[Crossing]:
        out: list[Crossing] = []
        for s in settlements:
            for line in s.lines:
                held = self.reservations.pop((s.reservation_id, line.counter.budget_id), None)
                state = self.counters.get(line.counter)
                if state is None:
                    continue
                if held is not None:
                    state[1] -= held[1]
                if s.actual > 0:
                    state[0] += s.actual
                    if line.soft_limit is not None and state[0] >= line.soft_limit and not state[2]:
                        state[2] = 1
                        out.append(Crossing(line.counter, state[0], line.soft_limit))
        return out

    async def release_expired(self, *, now: datetime) -> int:
        expired = [k for k, (_, _, at) in self.reservations.items() if at < now]
        for k in expired:
            counter, amount, _ = self.reservations.pop(k)
            self.counters[counter][1] -= amount
        return len(expired)

    async def state(self, counters: Sequence[CounterRef], *, now: datetime) -> dict[CounterRef, CounterState]:
        return {c: CounterState(self.counters[c][0], self.counters[c][1]) for c in counters if c in self.counters}

    async def forget(self, budget: BudgetDef) -> None:
        for c in [c for c in self.counters if c.budget_id == budget.id]:
            del self.counters[c]
        for k in [k for k in self.reservations if k[1] == budget.id]:
            del self.reservations[k]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
