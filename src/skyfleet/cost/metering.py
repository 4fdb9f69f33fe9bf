"""Metering: one usage record per request id, written in batches off the request path.

``on_finish`` (a :class:`~skyfleet.gateway.context.RequestObserver`) only appends the finished
:class:`~skyfleet.gateway.context.RequestRecord` to an in-memory queue: O(1), no I/O, never
blocks. A background task turns records into rows (pricing them: the charge of the replica that
served the request, :meth:`~skyfleet.cost.pricing.Pricing.charge_micros`) and writes them with
one multi-row ``INSERT ... ON CONFLICT DO NOTHING`` per batch: every ``cost.usage_flush_interval_s``
(1 s), or at once when ``cost.usage_batch_size`` records are waiting. A request id already stored
is skipped, so a batch retried after an unclear failure counts once. Each row names the gateway
instance that served the request (``owner``, ``gw.instance_id``): local replica ids (``local-0``)
repeat across gateways, and the reports join a request to its replica's cost interval on
(owner, replica id) (docs/cost.md, "Attribution").

* Store unreachable: the batch stays queued and is retried with backoff (0.5 s doubling to 10 s);
  up to ``cost.usage_max_pending`` records are kept in memory, beyond that new ones are dropped
  and counted (``skyfleet_usage_dropped_total``), never blocking a request.
* Graceful shutdown (:meth:`UsageWriter.close`, from ``Gateway.stop``): every queued record is
  written (retried for up to ``close_timeout_s`` if the store is down).
* A crash (SIGKILL, power loss) loses the records still in memory: those of requests that ended
  in the last flush interval (about 1 s), more only if the store was already unreachable then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from skyfleet.clock import Clock
from skyfleet.cost.pricing import Pricing
from skyfleet.gateway.context import RequestRecord
from skyfleet.state.usage import insert_usage

log = logging.getLogger("skyfleet.metering")

#: Statuses a usage record can have.
STATUSES = ("completed", "cancelled", "failed")

_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 10.0


class UsageSink(Protocol):
    """Where finished requests go to be metered (``gw.usage``)."""

    def on_finish(self, record: RequestRecord) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class DiscardUsage:
    """A sink that meters nothing (tests, tools)."""

    def on_finish(self, record: RequestRecord) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def usage_row(record: RequestRecord, pricing: Pricing, *, owner: str | None = None,
              ended_wall: float | None = None) -> dict[str, Any]:
    """The ``usage_records`` row of a finished request (ids, tokens, timings, money; never text).

    ``owner``: the instance id of the gateway that served it (None: unknown, the reports then guess
    the replica interval from the replica id and the time).
    """
    status = record.status if record.status in STATUSES else "failed"
    started = record.started_wall
    ended = started + max(0.0, record.duration_s) if started > 0 else (ended_wall or 0.0)
    if started <= 0:
        started = ended - max(0.0, record.duration_s)
    try:
        pool: str | None = pricing.price_of(record.model, record.replica_id).pool
    except LookupError:
        pool = None
    return {
        "request_id": record.request_id[:64], "tenant_id": record.tenant_id, "key_id": record.key_id,
        "model": record.model[:200], "route": record.route[:16], "owner": owner[:64] if owner else None,
        "replica_id": record.replica_id, "pool": pool,
        "status": status, "http_status": record.http_status, "started_at": _utc(started), "ended_at": _utc(ended),
        "ttft_ms": round(record.ttft_s * 1000) if record.ttft_s is not None else None,
        "prompt_tokens": max(0, record.prompt_tokens), "cached_tokens": max(0, record.cached_tokens),
        "completion_tokens": max(0, record.completion_tokens),
        "charged_usd_micros": pricing.charge_micros(record.model, record.replica_id, record.prompt_tokens,
                                                    record.cached_tokens, record.completion_tokens),
    }


class UsageWriter:
    """The batching :class:`UsageSink` (module docstring)."""

    def __init__(self, engine: AsyncEngine, pricing: Pricing, clock: Clock, *, owner: str | None = None,
                 batch_size: int = 500,
                 flush_interval_s: float = 1.0, max_pending: int = 100_000, close_timeout_s: float = 10.0,
                 on_charge: Callable[[RequestRecord, int], None] | None = None,
                 on_drop: Callable[[int], None] | None = None,
                 on_write_error: Callable[[], None] | None = None) -> None:
        self._engine = engine
        self._pricing = pricing
        self._clock = clock
        #: The gateway instance id written into every row (``usage_records.owner``).
        self.owner = owner
        self._batch = batch_size
        self._interval = flush_interval_s
        self._max_pending = max_pending
        self._close_timeout = close_timeout_s
        self._on_charge = on_charge
        self._on_drop = on_drop
        self._on_write_error = on_write_error
        self._records: deque[tuple[RequestRecord, float]] = deque()  # from on_finish, not yet priced
        self._rows: deque[dict[str, Any]] = deque()  # priced, not yet written
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        self.written = 0

    # -- the request path: O(1), no I/O -----------------------------------------------------------
    def on_finish(self, record: RequestRecord) -> None:
        if self._closed or len(self._records) + len(self._rows) >= self._max_pending:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(1)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("usage records dropped: the queue is full (is the store down?)",
                            extra={"dropped": self.dropped})
            return
        self._records.append((record, self._clock.wall()))
        if len(self._records) >= self._batch:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._records) + len(self._rows)

    # -- the background writer ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-writer")

    def _price(self) -> None:
        while self._records:
            record, wall = self._records.popleft()
            try:
                row = usage_row(record, self._pricing, owner=self.owner, ended_wall=wall)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop metering
                log.error("usage record could not be priced", extra={"error_type": type(exc).__name__})
                continue
            self._rows.append(row)
            if self._on_charge is not None and row["charged_usd_micros"]:
                self._on_charge(record, row["charged_usd_micros"])

    async def flush(self) -> bool:
        """Write everything queued, a batch per statement; False if the store failed (rows kept)."""
        self._price()
        while self._rows:
            n = min(self._batch, len(self._rows))
            batch = [self._rows[i] for i in range(n)]
            try:
                await insert_usage(self._engine, batch)
            except Exception as exc:  # noqa: BLE001 - any store failure: keep the rows, retry later
                if self._on_write_error is not None:
                    self._on_write_error()
                log.warning("usage write failed; will retry", extra={"error_type": type(exc).__name__,
                                                                     "pending": self.pending})
                return False
            for _ in range(n):
                self._rows.popleft()
            self.written += n
        return True

    async def _run(self) -> None:
        backoff = _BACKOFF_START_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            self._wake.clear()
            if await self.flush():
                backoff = _BACKOFF_START_S
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def close(self) -> None:
        """Stop the background task and write everything still queued (graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        backoff = _BACKOFF_START_S
        while not await self.flush():
            if loop.time() + backoff > deadline:
                log.error("usage records lost at shutdown: the store is unreachable",
                          extra={"lost": self.pending})
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)
        self._closed = True
