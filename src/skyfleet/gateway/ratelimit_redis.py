"""Rate-limit buckets in Redis, shared by every gateway: one atomic Lua script per request.

* ``ACQUIRE`` checks and charges all of a request's buckets (tenant and key, requests and tokens)
  in one call, all or nothing; ``ADJUST`` reconciles token buckets. Both are line-by-line
  mirrors of :func:`skyfleet.gateway.ratelimit.check_all` / ``adjust`` (a property test runs
  both on the same inputs). Scripts are sent with EVALSHA; on NOSCRIPT (a restarted or flushed
  server) the call is repeated with EVAL, which also caches the script again.
* Time is the Redis server's own (``TIME``), so gateways with skewed clocks still share one
  timeline. Tests may pass the caller's clock instead (``now``).
* Keys: ``<limits.redis_prefix>:{<tenant id>}:rpm|tpm`` and ``...:{<tenant id>}:key:<key id>:rpm|tpm``;
  the value is ``"<level> <at>"``. Ids only, nothing secret. The braces are a Cluster hash tag (one
  slot per tenant). Every write sets a TTL: the time until the bucket is full again plus one
  period, so idle buckets disappear.
* Failure: every call is bounded by ``limits.redis_timeout_s`` (pool wait, connect and reply) and
  never retried; after a failure Redis is left alone for :data:`RETRY_AFTER_S` (callers get
  :class:`LimiterUnavailableError` at once, and apply ``limits.on_redis_error``). One warning is
  logged per outage, not per request.
* Reconciliation is queued and sent by one background task, many adjustments per round trip
  (a pipeline); it is best effort: adjustments that fail are dropped (and counted in the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from skyfleet.gateway.ratelimit import (
    PERIOD_S,
    TOLERANCE_S,
    BucketResult,
    Decision,
    LimiterUnavailableError,
)
from skyfleet.state.redis_lua import LuaScript

log = logging.getLogger("skyfleet.ratelimit")

#: After a failed call, how long requests skip Redis (and get the on_redis_error policy).
RETRY_AFTER_S = 1.0
#: Longest TTL written (ms): a bucket deeper in debt than this is forgiven the rest.
_MAX_TTL_MS = 10**12

# Shared prologue: ``now`` from ARGV[1] ('' = the server's TIME), the period, and refill().
_PRELUDE = """
local n = #KEYS
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local period = tonumber(ARGV[2])
local function refill(raw, limit)
  if not raw then return 0, now end
  local l, a = string.match(raw, '^(%S+) (%S+)$')
  local level, at = tonumber(l), tonumber(a)
  local elapsed = now - at
  if elapsed > 0 then
    return math.max(0, level - elapsed * limit / period), now
  end
  return level, at
end
local function save(key, level, at, limit)
  local ttl = math.min(math.floor(level * period / limit * 1000) + math.floor(period * 1000), __MAX_TTL__)
  redis.call('SET', key, string.format('%.17g %.17g', level, at), 'PX', ttl)
end
""".replace("__MAX_TTL__", str(_MAX_TTL_MS))

#: KEYS: buckets. ARGV: now, period, then n limits, then n costs.
#: Returns {allowed, then per bucket: remaining (integer), reset (string), wait (string)}.
ACQUIRE = _PRELUDE + """
local tol = __TOL__
local levels, ats, charged, waits = {}, {}, {}, {}
local allowed = true
for i = 1, n do
  local limit = tonumber(ARGV[2 + i])
  levels[i], ats[i] = refill(redis.call('GET', KEYS[i]), limit)
  charged[i] = math.min(tonumber(ARGV[2 + n + i]), limit)
  local wait = (levels[i] + charged[i] - limit) * period / limit
  if wait > tol then
    allowed = false
    waits[i] = wait
  else
    waits[i] = 0
  end
end
local out = {allowed and 1 or 0}
for i = 1, n do
  local limit = tonumber(ARGV[2 + i])
  local level = levels[i]
  if allowed then
    level = level + charged[i]
    save(KEYS[i], level, ats[i], limit)
  end
  out[#out + 1] = math.floor(math.max(0, limit - level) + 1e-9)
  out[#out + 1] = string.format('%.17g', level * period / limit)
  out[#out + 1] = string.format('%.17g', waits[i])
end
return out
""".replace("__TOL__", repr(TOLERANCE_S))

#: KEYS: buckets. ARGV: now, period, then n limits, then n deltas (negative: refund).
ADJUST = _PRELUDE + """
for i = 1, n do
  local limit = tonumber(ARGV[2 + i])
  local level, at = refill(redis.call('GET', KEYS[i]), limit)
  save(KEYS[i], math.max(0, level + tonumber(ARGV[2 + n + i])), at, limit)
end
return n
"""




_ACQUIRE = LuaScript.of(ACQUIRE)
_ADJUST = LuaScript.of(ADJUST)
_ERRORS = (RedisError, OSError, TimeoutError)


def _decision(raw: list[Any]) -> Decision:
    results = tuple(
        BucketResult(int(raw[i]), float(raw[i + 1]), float(raw[i + 2])) for i in range(1, len(raw), 3)
    )
    return Decision(bool(int(raw[0])), results)


class RedisBuckets:
    """:class:`~skyfleet.gateway.ratelimit.BucketStore` on Redis (pooled ``redis.asyncio`` connections)."""

    def __init__(self, url: str, *, timeout_s: float, max_connections: int, period: float = PERIOD_S,
                 now: Callable[[], float] | None = None) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.client = aioredis.Redis.from_pool(pool)
        self._timeout_s = timeout_s
        self._period = repr(float(period))
        self._now = now
        self._down_until = 0.0
        self._down = False
        self._pending: list[tuple[Sequence[str], Sequence[int], Sequence[float]]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    def _args(self, limits: Sequence[int], values: Sequence[float]) -> list[Any]:
        return ["" if self._now is None else repr(self._now()), self._period, *limits, *values]

    async def _run(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await script.run(self.client, keys, args)

    async def acquire(self, keys: Sequence[str], limits: Sequence[int], costs: Sequence[float]) -> Decision:
        if self._down and time.monotonic() < self._down_until:
            raise LimiterUnavailableError("unavailable")
        try:
            async with asyncio.timeout(self._timeout_s):
                raw = await self._run(_ACQUIRE, keys, self._args(limits, costs))
        except _ERRORS as exc:
            self._failed(exc)
            raise LimiterUnavailableError(type(exc).__name__) from None
        if self._down:
            self._down = False
            log.info("rate-limit store reachable again")
        return _decision(raw)

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            log.warning("rate-limit store unreachable; applying limits.on_redis_error",
                        extra={"error_type": type(exc).__name__})
        self._down = True
        self._down_until = time.monotonic() + RETRY_AFTER_S

    def adjust(self, keys: Sequence[str], limits: Sequence[int], deltas: Sequence[float]) -> None:
        self._pending.append((keys, limits, deltas))
        self._wake.set()

    async def flush(self) -> None:
        """Send every queued adjustment in one pipeline (one round trip)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        calls = [(keys, self._args(limits, deltas)) for keys, limits, deltas in batch]
        try:
            async with asyncio.timeout(self._timeout_s):
                results = await _ADJUST.run_many(self.client, calls)
        except _ERRORS as exc:
            self._failed(exc)
            log.warning("rate-limit reconciliation dropped", extra={"adjustments": len(batch)})
            return
        failed = sum(isinstance(r, Exception) for r in results)
        if failed:
            log.warning("rate-limit reconciliation failed", extra={"adjustments": failed})

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="ratelimit-reconcile")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()
        await self.client.aclose()
