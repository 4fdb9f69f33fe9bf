"""Rate limits and quotas: requests and tokens per minute, per tenant and per API key.

Algorithm (a token bucket, the same as GCRA): every limit ``L`` (per ``period`` = 60 s) is a
bucket of capacity ``L`` that refills continuously at ``L / period`` per second. Its state is
``(level, at)``: the amount in use at time ``at``; empty state means a full bucket. A request of
cost ``c`` is admitted when ``level + c <= L`` after the refill; otherwise it must wait exactly
``(level + c - L) * period / L`` seconds (its ``retry_after``). So a fresh bucket admits ``L`` at
once (the burst is one minute's limit), requests spaced ``period / L`` apart are all admitted,
and any window of ``W`` seconds admits at most ``L * (1 + W / period)``. Decisions are allowed
within :data:`TOLERANCE_S` (1 µs) of the exact time, to absorb floating-point rounding.

* A request is checked against all its buckets at once (tenant requests, key requests, tenant
  tokens, key tokens): admitted only if every bucket admits it, and a rejected request consumes
  nothing from any bucket.
* Tokens: admission charges an estimate, ``ceil(request body bytes / 4)`` plus the request's
  output budget (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, else
  ``limits.estimate_completion_tokens``), capped at the bucket's capacity (an estimate larger
  than a minute's limit is charged as one full minute). When the request ends its
  :class:`~skyfleet.gateway.context.RequestRecord` reconciles the bucket with the actual
  ``prompt_tokens + completion_tokens`` (a refund, or an extra debit that may leave the bucket in
  debt: later requests then wait until it is paid off). Reconciliation never blocks a response.
* Limits come from the authenticated :class:`~skyfleet.iam.principal.Principal`: the tenant's
  (default: ``limits.default_tenant_rpm`` / ``default_tenant_tpm``; None: unlimited) and the
  key's (None: none). A limit of 0 refuses everything.

Backends (:class:`BucketStore`): :class:`InProcessBuckets` (one gateway: buckets in a dict, the
injected clock) and :class:`~skyfleet.gateway.ratelimit_redis.RedisBuckets` (several gateways:
one atomic Lua script per request, Redis' own clock). Both run the same arithmetic, written once
here in Python (:func:`check_all`, :func:`adjust`) and mirrored line by line in Lua; a property
test holds them equal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from skyfleet.clock import Clock, SystemClock
from skyfleet.errors import RateLimitError, ServiceUnavailableError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from skyfleet.config import LimitSettings
    from skyfleet.gateway.context import RequestRecord
    from skyfleet.iam.principal import Principal

log = logging.getLogger("skyfleet.ratelimit")

PERIOD_S = 60.0
#: A request that would have to wait at most this long is admitted (floating-point slack).
TOLERANCE_S = 1e-6
#: Bytes of request body counted as one prompt token in the admission estimate.
BYTES_PER_TOKEN = 4

Kind = Literal["requests", "tokens"]


# -- the arithmetic (pure; mirrored in ratelimit_redis.ACQUIRE / ADJUST) ------------------------


@dataclass(frozen=True, slots=True)
class BucketState:
    """``level`` units in use at time ``at`` (level 0, or no state at all: a full bucket)."""

    level: float
    at: float


@dataclass(frozen=True, slots=True)
class BucketResult:
    remaining: int  # whole units left after this decision
    reset_s: float  # until the bucket is full again
    wait_s: float  # > 0: this bucket refused the request; it could pass after this long


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    buckets: tuple[BucketResult, ...]

    @property
    def retry_after_s(self) -> float:
        return max((b.wait_s for b in self.buckets), default=0.0)


def refill(state: BucketState | None, now: float, limit: int, period: float = PERIOD_S) -> BucketState:
    """The bucket at ``now``. A clock that went backwards refills nothing."""
    if state is None:
        return BucketState(0.0, now)
    elapsed = now - state.at
    if elapsed > 0:
        return BucketState(max(0.0, state.level - elapsed * limit / period), now)
    return state


def check_all(states: Sequence[BucketState | None], now: float, limits: Sequence[int], costs: Sequence[float],
              period: float = PERIOD_S) -> tuple[Decision, list[BucketState | None]]:
    """Admit a request against all its buckets at once: all of them, or none (states unchanged)."""
    current = [refill(s, now, lim, period) for s, lim in zip(states, limits, strict=True)]
    charged = [min(float(c), float(lim)) for c, lim in zip(costs, limits, strict=True)]
    waits = []
    allowed = True
    for st, lim, cost in zip(current, limits, charged, strict=True):
        wait = (st.level + cost - lim) * period / lim
        if wait > TOLERANCE_S:
            allowed = False
            waits.append(wait)
        else:
            waits.append(0.0)
    results = []
    new_states: list[BucketState | None] = list(states)
    for i, (st, lim) in enumerate(zip(current, limits, strict=True)):
        level = st.level
        if allowed:
            level = level + charged[i]
            new_states[i] = BucketState(level, st.at)
        results.append(BucketResult(math.floor(max(0.0, lim - level) + 1e-9), level * period / lim, waits[i]))
    return Decision(allowed, tuple(results)), new_states


def adjust(state: BucketState | None, now: float, delta: float, limit: int,
           period: float = PERIOD_S) -> BucketState:
    """Charge ``delta`` more units (negative: a refund) without a check: reconciliation."""
    st = refill(state, now, limit, period)
    return BucketState(max(0.0, st.level + delta), st.at)


# -- estimates and headers ----------------------------------------------------------------------


def estimate_tokens(body_bytes: int, max_output: int | None, default_output: int) -> int:
    """Tokens charged at admission, before the engine has counted them."""
    return -(-body_bytes // BYTES_PER_TOKEN) + (max_output if max_output is not None else default_output)


def request_size(content_length: str | None, payload: dict[str, Any]) -> int:
    """The request body's size: its Content-Length, else the payload serialised again."""
    if content_length is not None and content_length.isdigit():
        return int(content_length)
    return len(orjson.dumps(payload))


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    minutes, rest = divmod(ms, 60_000)
    sec = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{sec}s" if minutes else f"{sec}s"


# -- backends -----------------------------------------------------------------------------------


class LimiterUnavailableError(Exception):
    """The shared bucket store could not be reached in time (the message names the error type only)."""


class BucketStore(Protocol):
    async def acquire(self, keys: Sequence[str], limits: Sequence[int], costs: Sequence[float]) -> Decision:
        """Check and charge all ``keys`` atomically; raise :class:`LimiterUnavailableError` if unreachable."""
        ...

    def adjust(self, keys: Sequence[str], limits: Sequence[int], deltas: Sequence[float]) -> None:
        """Reconcile: charge ``deltas`` (negative: refund). Never blocks; best effort."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class InProcessBuckets:
    """Buckets in this process's memory, on the injected clock. Several gateways do not share them.

    Reads and writes happen without an ``await`` in between, so each call is atomic on the loop.
    Full buckets are forgotten now and then (amortised), so memory follows the active keys.
    """

    def __init__(self, clock: Clock, period: float = PERIOD_S) -> None:
        self._clock = clock
        self._period = period
        self._states: dict[str, tuple[BucketState, int]] = {}
        self._sweep_at = 1024

    async def acquire(self, keys: Sequence[str], limits: Sequence[int], costs: Sequence[float]) -> Decision:
        now = self._clock.now()
        states = self._states
        old = [states.get(k) for k in keys]
        decision, new = check_all([o[0] if o else None for o in old], now, limits, costs, self._period)
        if decision.allowed:
            for key, st, limit in zip(keys, new, limits, strict=True):
                if st is not None:
                    states[key] = (st, limit)
            if len(states) > self._sweep_at:
                self._sweep(now)
        return decision

    def adjust(self, keys: Sequence[str], limits: Sequence[int], deltas: Sequence[float]) -> None:
        now = self._clock.now()
        for key, limit, delta in zip(keys, limits, deltas, strict=True):
            old = self._states.get(key)
            self._states[key] = (adjust(old[0] if old else None, now, delta, limit, self._period), limit)

    def level(self, key: str, limit: int) -> float:
        """The bucket's level now (0: full); for tests and diagnostics."""
        old = self._states.get(key)
        return refill(old[0] if old else None, self._clock.now(), limit, self._period).level

    def __len__(self) -> int:
        return len(self._states)

    def _sweep(self, now: float) -> None:
        self._states = {k: (s, lim) for k, (s, lim) in self._states.items()
                        if refill(s, now, lim, self._period).level > 0}
        self._sweep_at = max(1024, 2 * len(self._states))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# -- the limiter the request path calls ---------------------------------------------------------


@dataclass(slots=True)
class Admission:
    """What one admitted request was charged; reconciled when its record arrives."""

    token_keys: tuple[str, ...]
    token_limits: tuple[int, ...]
    charged: tuple[float, ...]
    headers: dict[str, str]
    settled: bool = False

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode()) for k, v in self.headers.items()]

    def take_charged(self) -> tuple[float, ...]:
        """The estimate still to reconcile: all of it the first time, nothing afterwards."""
        if self.settled:
            return (0.0,) * len(self.charged)
        self.settled = True
        return self.charged


@dataclass(frozen=True, slots=True)
class _Bucket:
    key: str
    limit: int
    kind: Kind
    scope: str  # "tenant" | "API key"


_KIND_TEXT = {"requests": ("requests", "RPM"), "tokens": ("tokens", "TPM")}


class RateLimiter:
    """Admits requests (:meth:`admit`) and reconciles their token charges (a ``RequestObserver``)."""

    def __init__(self, store: BucketStore, settings: LimitSettings, *,
                 registry: CollectorRegistry | None = None) -> None:
        self._store = store
        self._settings = settings
        self._prefix = settings.redis_prefix
        self._deny = settings.on_redis_error == "deny"
        self._default_output = settings.estimate_completion_tokens
        self._rejected = self._unavailable = None
        if registry is not None:
            from prometheus_client import Counter

            self._rejected = Counter(
                "skyfleet_ratelimited_requests", "Requests refused by a rate limit (429).", ["kind"],
                registry=registry)
            self._unavailable = Counter(
                "skyfleet_ratelimit_unavailable", "Requests decided without the shared limiter store "
                "(Redis unreachable), by the on_redis_error policy applied.", ["policy"], registry=registry)

    @classmethod
    def from_settings(cls, settings: LimitSettings, redis_url: str | None, clock: Clock,
                      registry: CollectorRegistry | None = None) -> RateLimiter:
        if redis_url is None:
            return cls(InProcessBuckets(clock), settings, registry=registry)
        from skyfleet.gateway.ratelimit_redis import RedisBuckets

        return cls(RedisBuckets(redis_url, timeout_s=settings.redis_timeout_s,
                                max_connections=settings.redis_max_connections), settings, registry=registry)

    @classmethod
    def default(cls) -> RateLimiter:
        """No configured defaults, in-process: only limits carried by principals apply."""
        from skyfleet.config import LimitSettings

        return cls(InProcessBuckets(SystemClock()), LimitSettings())

    @property
    def store(self) -> BucketStore:
        return self._store

    async def start(self) -> None:
        await self._store.start()

    async def close(self) -> None:
        await self._store.close()

    def buckets(self, p: Principal) -> list[_Bucket]:
        """The buckets a principal's requests are checked against (requests first, then tokens)."""
        s = self._settings
        t_rpm = p.tenant_rpm_limit if p.tenant_rpm_limit is not None else s.default_tenant_rpm
        t_tpm = p.tenant_tpm_limit if p.tenant_tpm_limit is not None else s.default_tenant_tpm
        # Tenant and key ids are opaque identifiers, never secrets. The braces are a Redis Cluster
        # hash tag: a request's buckets all live in its tenant's slot, so one script can take them all.
        tenant = f"{self._prefix}:{{{p.tenant_id}}}"
        out: list[_Bucket] = []
        if t_rpm is not None:
            out.append(_Bucket(f"{tenant}:rpm", t_rpm, "requests", "tenant"))
        if p.rpm_limit is not None:
            out.append(_Bucket(f"{tenant}:key:{p.key_id}:rpm", p.rpm_limit, "requests", "API key"))
        if t_tpm is not None:
            out.append(_Bucket(f"{tenant}:tpm", t_tpm, "tokens", "tenant"))
        if p.tpm_limit is not None:
            out.append(_Bucket(f"{tenant}:key:{p.key_id}:tpm", p.tpm_limit, "tokens", "API key"))
        return out

    async def admit(self, principal: Principal, payload: dict[str, Any], content_length: str | None,
                    max_output: int | None) -> Admission | None:
        """Charge one request, or raise the 429 (:class:`RateLimitError`). None: no limit applies."""
        buckets = self.buckets(principal)
        if not buckets:
            return None
        for b in buckets:
            if b.limit <= 0:
                self._count_rejected(b.kind)
                what, abbr = _KIND_TEXT[b.kind]
                message = f"This {b.scope} may not make requests: its {what} per min ({abbr}) limit is 0."
                raise RateLimitError(message, kind=b.kind)
        estimate = 0
        if any(b.kind == "tokens" for b in buckets):
            size = request_size(content_length, payload)
            estimate = estimate_tokens(size, max_output, self._default_output)
        costs = [1 if b.kind == "requests" else estimate for b in buckets]
        try:
            decision = await self._store.acquire([b.key for b in buckets], [b.limit for b in buckets], costs)
        except LimiterUnavailableError:
            policy = "deny" if self._deny else "allow"
            if self._unavailable is not None:
                self._unavailable.labels(policy).inc()
            if self._deny:
                raise ServiceUnavailableError("Rate limits cannot be checked right now; try again shortly.",
                                              code="rate_limiter_unavailable", retry_after_s=1) from None
            return None
        headers = _headers(buckets, decision)
        if not decision.allowed:
            raise self._rejection(buckets, decision, costs, headers)
        tokens = [(b, min(float(c), float(b.limit))) for b, c in zip(buckets, costs, strict=True)
                  if b.kind == "tokens"]
        return Admission(tuple(b.key for b, _ in tokens), tuple(b.limit for b, _ in tokens),
                         tuple(c for _, c in tokens), headers)

    def cancel(self, admission: Admission | None) -> None:
        """The request ended before reaching an engine: refund its token estimate."""
        if admission is not None and admission.token_keys:
            charged = admission.take_charged()
            if any(charged):
                self._store.adjust(admission.token_keys, admission.token_limits, [-c for c in charged])

    def on_finish(self, record: RequestRecord) -> None:
        """Reconcile the token buckets with what the request really used (fire and forget)."""
        adm = record.admission
        if adm is None or not adm.token_keys:
            return
        actual = record.prompt_tokens + record.completion_tokens
        deltas = [actual - c for c in adm.take_charged()]
        if any(deltas):
            self._store.adjust(adm.token_keys, adm.token_limits, deltas)

    def _count_rejected(self, kind: Kind) -> None:
        if self._rejected is not None:
            self._rejected.labels(kind).inc()

    def _rejection(self, buckets: list[_Bucket], decision: Decision, costs: list[int],
                   headers: dict[str, str]) -> RateLimitError:
        # The bucket that makes the client wait longest is the one to name.
        results = decision.buckets
        i = max(range(len(buckets)), key=lambda j: (results[j].wait_s, buckets[j].kind == "requests"))
        b, r = buckets[i], results[i]
        refused = {buckets[j].kind for j in range(len(buckets)) if results[j].wait_s > 0}
        kind: Kind = "requests" if "requests" in refused else "tokens"
        self._count_rejected(kind)
        what, abbr = _KIND_TEXT[b.kind]
        wait = decision.retry_after_s
        message = (f"Rate limit reached for {what} per min ({abbr}) on this {b.scope}: Limit {b.limit}, "
                   f"Used {b.limit - r.remaining}, Requested {min(costs[i], b.limit)}. "
                   f"Please try again in {duration_text(wait)}.")
        # Rounded up, less the tolerance within which a request is admitted anyway.
        headers = {"Retry-After": str(max(1, math.ceil(wait - TOLERANCE_S))),
                   "retry-after-ms": str(max(1, math.ceil((wait - TOLERANCE_S) * 1000))), **headers}
        return RateLimitError(message, kind=kind, headers=headers)


def _headers(buckets: list[_Bucket], decision: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the most constrained bucket of each kind."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        tightest: tuple[_Bucket, BucketResult] | None = None
        for b, r in zip(buckets, decision.buckets, strict=True):
            if b.kind == kind and (tightest is None or r.remaining < tightest[1].remaining):
                tightest = (b, r)
        if tightest is not None:
            b, r = tightest
            headers[f"x-ratelimit-limit-{kind}"] = str(b.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(r.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration_text(r.reset_s)
    return headers
