"""Budget counters in Redis, shared by every gateway: one Lua script (one EVAL) per request.

Keys, per budget and period window (ids only, nothing secret; the braces are a Cluster hash tag,
so all of a tenant's counters, its own and its keys', live in one slot and one script can take
them all)::

    <prefix>:{<tenant id>}:<budget id>:<window start, epoch s>       hash: s (spent), r (reserved), a (alerted)
    ...:res                                                        zset: reservation id -> expiry (ms)
    ...:amt                                                        hash: reservation id -> amount

* ``RESERVE`` first releases the counters' expired reservations, then checks every counter
  (``spent + reserved + amount <= hard``), then reserves on all of them: all or none, atomically
  (Redis runs one script at a time). Expiry is on Redis' clock (``TIME``), shared by every gateway.
* ``SETTLE`` releases a reservation (only if it is still there: never twice) and adds the actual
  charge to ``s``; ``HSETNX a`` elects the one gateway that sends the soft-limit alert.
* Daily and monthly counters expire a day after their window ends; ``total`` ones never do.
* Durability is Redis': without persistence (AOF/RDB) a Redis restart forgets the spend so far.
* Hard limits come from the gateway's cached definitions (``budgets.cache_ttl_s``), not from the
  store, so a lowered limit reaches other gateways within that TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from skyfleet.cost.budgets import (
    BudgetDef,
    BudgetUnavailableError,
    CounterRef,
    CounterState,
    Crossing,
    ReserveLine,
    Settlement,
)
from skyfleet.state.redis_lua import LuaScript

#: How long after its window ends a daily or monthly counter is kept.
KEEP_AFTER_END = timedelta(days=1)

_PRELUDE = """
local n = #KEYS / 3
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function purge(c, z, a)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #expired == 0 then return end
  local total = 0
  for _, m in ipairs(expired) do
    local amt = redis.call('HGET', a, m)
    if amt then total = total + tonumber(amt) end
    redis.call('HDEL', a, m)
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  if total > 0 then redis.call('HINCRBY', c, 'r', -total) end
end
"""

#: KEYS: (counter, res, amt) per line. ARGV: reservation id, ttl ms, then per line: amount, hard
#: limit (-1: none), expire-at epoch s (0: never). Returns 0, or the 1-based line that refused.
RESERVE = _PRELUDE + """
local rid, ttl = ARGV[1], tonumber(ARGV[2])
for i = 1, n do purge(KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]) end
for i = 1, n do
  local hard = tonumber(ARGV[3*i+1])
  if hard >= 0 then
    local v = redis.call('HMGET', KEYS[3*i-2], 's', 'r')
    if tonumber(v[1] or '0') + tonumber(v[2] or '0') + tonumber(ARGV[3*i]) > hard then return i end
  end
end
for i = 1, n do
  local c, z, a = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  redis.call('HINCRBY', c, 'r', ARGV[3*i])
  redis.call('ZADD', z, now + ttl, rid)
  redis.call('HSET', a, rid, ARGV[3*i])
  local exp = tonumber(ARGV[3*i+2])
  if exp > 0 then
    redis.call('EXPIREAT', c, exp)
    redis.call('EXPIREAT', z, exp)
    redis.call('EXPIREAT', a, exp)
  end
end
return 0
"""

#: KEYS: (counter, res, amt) per line. ARGV: reservation id, actual, then per line the soft limit
#: (-1: none). Returns {line, spent, ...} for the soft limits this call crossed first.
SETTLE = _PRELUDE + """
local rid, actual = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 1, n do
  local c, z, a = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local held = redis.call('HGET', a, rid)
  if held then
    redis.call('HDEL', a, rid)
    redis.call('ZREM', z, rid)
    redis.call('HINCRBY', c, 'r', -tonumber(held))
  end
  if actual > 0 and (held or redis.call('EXISTS', c) == 1) then
    local spent = redis.call('HINCRBY', c, 's', actual)
    local soft = tonumber(ARGV[2+i])
    if soft >= 0 and spent >= soft and redis.call('HSETNX', c, 'a', '1') == 1 then
      out[#out+1] = i
      out[#out+1] = spent
    end
  end
end
return out
"""

#: KEYS: (counter, res, amt) per counter. Releases expired reservations; returns {s, r, ...}.
STATE = _PRELUDE + """
local out = {}
for i = 1, n do
  purge(KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i])
  local v = redis.call('HMGET', KEYS[3*i-2], 's', 'r')
  out[#out+1] = tonumber(v[1] or '-1')
  out[#out+1] = tonumber(v[2] or '0')
end
return out
"""




_RESERVE, _SETTLE, _STATE = LuaScript.of(RESERVE), LuaScript.of(SETTLE), LuaScript.of(STATE)
_ERRORS = (RedisError, OSError, TimeoutError)


class RedisBudgetCounters:
    """:class:`~skyfleet.cost.budgets.BudgetBackend` on Redis (pooled ``redis.asyncio`` connections)."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float, ttl_s: float, max_connections: int = 64) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.client = aioredis.Redis.from_pool(pool)
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._ttl_ms = int(ttl_s * 1000)

    def keys(self, counter: CounterRef) -> list[str]:
        base = f"{self._prefix}:{{{counter.tenant_id}}}:{counter.budget_id}:{int(counter.period_start.timestamp())}"
        return [base, base + ":res", base + ":amt"]

    async def _run(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await script.run(self.client, keys, args)
        except _ERRORS as exc:
            raise BudgetUnavailableError(type(exc).__name__) from None

    async def reserve(self, lines: Sequence[ReserveLine], reservation_id: str, *, now: datetime,
                      expires_at: datetime) -> int | None:
        keys: list[str] = []
        args: list[Any] = [reservation_id, self._ttl_ms]
        for line in lines:
            keys += self.keys(line.counter)
            expire = 0 if line.period_end is None else int((line.period_end + KEEP_AFTER_END).timestamp())
            args += [line.amount, -1 if line.hard_limit is None else line.hard_limit, expire]
        refused = int(await self._run(_RESERVE, keys, args))
        return None if refused == 0 else refused - 1

    async def settle(self, settlements: Sequence[Settlement], *, now: datetime) -> list[Crossing]:
        crossings: list[Crossing] = []
        calls = []
        for s in settlements:
            keys: list[str] = []
            for line in s.lines:
                keys += self.keys(line.counter)
            args = [s.reservation_id, s.actual, *(-1 if ln.soft_limit is None else ln.soft_limit for ln in s.lines)]
            calls.append((s, keys, args))
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                results = await _SETTLE.run_many(self.client, [(keys, args) for _, keys, args in calls])
        except _ERRORS as exc:
            raise BudgetUnavailableError(type(exc).__name__) from None
        for (s, _, _), raw in zip(calls, results, strict=True):
            if isinstance(raw, Exception):
                raise BudgetUnavailableError(type(raw).__name__)
            for j in range(0, len(raw), 2):
                line = s.lines[int(raw[j]) - 1]
                crossings.append(Crossing(line.counter, int(raw[j + 1]), line.soft_limit))
        return crossings

    async def release_expired(self, *, now: datetime) -> int:
        return 0  # RESERVE and STATE release a counter's expired reservations whenever they touch it

    async def state(self, counters: Sequence[CounterRef], *, now: datetime) -> dict[CounterRef, CounterState]:
        if not counters:
            return {}
        keys: list[str] = []
        for c in counters:
            keys += self.keys(c)
        raw = await self._run(_STATE, keys, [])
        out: dict[CounterRef, CounterState] = {}
        for i, c in enumerate(counters):
            spent, reserved = int(raw[2 * i]), int(raw[2 * i + 1])
            if spent >= 0 or reserved:
                out[c] = CounterState(max(0, spent), reserved)
        return out

    async def forget(self, budget: BudgetDef) -> None:
        pattern = f"{self._prefix}:{{{budget.tenant_id}}}:{budget.id}:*"
        try:
            async with asyncio.timeout(self._timeout_s * 10):
                found = [k async for k in self.client.scan_iter(match=pattern, count=500)]
                if found:
                    await self.client.delete(*found)
        except _ERRORS as exc:
            raise BudgetUnavailableError(type(exc).__name__) from None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self.client.aclose()
