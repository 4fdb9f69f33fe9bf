"""Lua scripts on Redis: sent by SHA (EVALSHA), resent whole (EVAL) when the server answers NOSCRIPT.

Shared by the rate limiter (gateway/ratelimit_redis.py) and the budget counters
(cost/budget_store_redis.py). Errors other than NOSCRIPT are the caller's to map.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


@dataclass(frozen=True, slots=True)
class LuaScript:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> LuaScript:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())

    async def run(self, client: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call: EVALSHA, or EVAL after a NOSCRIPT (a restarted or flushed server)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)  # type: ignore[misc]

    async def run_many(self, client: Redis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Many calls in one pipeline (one round trip; a second only for NOSCRIPT replies).

        Results come in call order; a call that failed has its exception in its place."""
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        results = list(await pipe.execute(raise_on_error=False))
        again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if again:
            pipe = client.pipeline(transaction=False)
            for i in again:
                keys, args = calls[i]
                pipe.eval(self.source, len(keys), *keys, *args)
            for i, r in zip(again, await pipe.execute(raise_on_error=False), strict=True):
                results[i] = r
        return results
