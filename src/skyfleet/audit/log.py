"""The gateway's :class:`~skyfleet.audit.Audit`: queue in memory, write in batches in the background.

* :meth:`AuditLog.record` never blocks and never raises. It sanitises the entry (see
  :func:`skyfleet.audit.chain.draft`) and puts it on a bounded in-memory queue. When the queue is
  full (the store is down or far behind) the entry is **dropped**: the request path is never
  held up by the audit log. Drops are counted (``skyfleet_audit_dropped_total`` and a warning log
  at most once a minute), so a gap is visible; the chain itself stays intact (it only ever holds
  what was written).
* :meth:`AuditLog.key_used` is cheap enough for every authenticated request: it counts uses per
  key in memory, and once per window (a minute) writes one ``key.use`` entry per key used, with
  the count. Failed authentications (``auth.failure`` without an actor) are counted the same
  per route between two writes (every ``flush_interval_s``): a flood of bad credentials writes
  one entry per route per flush, with the count.
* A background task (:meth:`start`/:meth:`close`, driven by the Gateway) writes the queue in
  batches every ``flush_interval_s`` (sooner when a batch is full), retrying with backoff while
  the store fails. :meth:`close` writes what is left, including the current key-use window.
  Entries still queued when the process dies are lost, as are entries dropped when full.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from skyfleet.audit import DetailValue
from skyfleet.audit.chain import AuditDraft, SealedEntry, draft
from skyfleet.clock import Clock
from skyfleet.iam.principal import Principal

log = logging.getLogger("skyfleet.audit")

_DROP_LOG_INTERVAL_S = 60.0
_MAX_BACKOFF_S = 5.0


class Appender(Protocol):
    async def append(self, drafts: Sequence[AuditDraft]) -> list[SealedEntry]: ...


def actor_id(actor: Principal | str | None) -> str | None:
    """An entry's ``actor``: the credential's key id (never the key), a fixed name ("cli"), or None."""
    if isinstance(actor, Principal):
        return actor.key_id
    return actor if isinstance(actor, str) else None


def default_tenant(actor: Principal | str | None) -> str | None:
    """The tenant an entry belongs to when the caller names none: the actor's own, unless the actor
    is a platform admin (whose actions belong to no tenant unless one is named)."""
    if isinstance(actor, Principal) and not actor.is_platform_admin:
        return actor.tenant_id
    return None


class AuditLog:
    """The real :class:`~skyfleet.audit.Audit` (see the module docstring)."""

    def __init__(
        self,
        appender: Appender,
        clock: Clock,
        *,
        max_pending: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        key_use_window_s: float = 60.0,
        max_keys_per_window: int = 100_000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._appender = appender
        self._clock = clock
        self._max_pending = max_pending
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._window_s = key_use_window_s
        self._max_keys = max_keys_per_window
        self._pending: deque[AuditDraft] = deque()
        #: Uses of each key in the current window, and the tenant each key belongs to.
        self._key_uses: dict[str, int] = {}
        self._key_tenants: dict[str, str | None] = {}
        #: Failed authentications in the current window, per route: a flood of bad credentials
        #: becomes one ``auth.failure`` entry per route per window (with a count), not one per request.
        self._auth_failures: dict[str | None, int] = {}
        self._window_start = clock.now()
        self._window_wall = clock.wall()
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_drop_log: float | None = None
        self.dropped = 0
        self.written = 0
        self._dropped_metric = self._written_metric = None
        if registry is not None:
            self._dropped_metric = Counter(
                "skyfleet_audit_dropped",
                "Audit entries dropped because the queue was full (the store was down or too slow).",
                registry=registry)
            self._written_metric = Counter("skyfleet_audit_written", "Audit entries written.",
                                           registry=registry)
            Gauge("skyfleet_audit_pending", "Audit entries queued, not yet written.",
                  registry=registry).set_function(lambda: len(self._pending))

    # -- the request path: never blocks, never raises --

    def record(
        self,
        action: str,
        *,
        actor: Principal | None,
        tenant_id: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        **detail: DetailValue,
    ) -> None:
        if action == "auth.failure" and actor is None and not detail:
            self._count_auth_failure(target)
            return
        self._enqueue(action, actor_id(actor), tenant_id if tenant_id is not None else default_tenant(actor),
                      target, outcome, detail)

    def _enqueue(self, action: str, actor: str | None, tenant_id: str | None, target: str | None,
                 outcome: str, detail: dict[str, DetailValue]) -> None:
        try:
            if len(self._pending) >= self._max_pending:
                self._drop()
                return
            at = datetime.fromtimestamp(self._clock.wall(), UTC)
            self._pending.append(draft(at, action, outcome=outcome, actor=actor, tenant_id=tenant_id,
                                       target=target, detail=detail))
            if len(self._pending) >= self._batch_size:
                self._wake.set()
        except Exception:  # noqa: BLE001 - auditing must never fail a request
            self._drop()

    def key_used(self, principal: Principal) -> None:
        """Count one use of ``principal``'s key; written as one ``key.use`` entry per key per window."""
        try:
            key_id = principal.key_id
            count = self._key_uses.get(key_id)
            if count is not None:
                self._key_uses[key_id] = count + 1
            elif len(self._key_uses) < self._max_keys:
                self._key_uses[key_id] = 1
                self._key_tenants[key_id] = default_tenant(principal)
            else:
                self._drop()
        except Exception:  # noqa: BLE001 - auditing must never fail a request
            self._drop()

    def _count_auth_failure(self, target: str | None) -> None:
        try:
            count = self._auth_failures.get(target)
            if count is not None:
                self._auth_failures[target] = count + 1
            elif len(self._auth_failures) < 1000:
                self._auth_failures[target] = 1
            else:
                self._auth_failures[None] = self._auth_failures.get(None, 0) + 1
        except Exception:  # noqa: BLE001 - auditing must never fail a request
            self._drop()

    def _drop(self) -> None:
        self.dropped += 1
        if self._dropped_metric is not None:
            self._dropped_metric.inc()
        now = self._clock.now()
        if self._last_drop_log is None or now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("audit queue full: entries dropped",
                        extra={"dropped_total": self.dropped, "pending": len(self._pending)})

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the background writer --

    def roll_key_uses(self) -> None:
        """Close the current key-use window: queue one ``key.use`` entry per key used in it."""
        self._roll_auth_failures()
        uses, tenants = self._key_uses, self._key_tenants
        self._key_uses, self._key_tenants = {}, {}
        since = datetime.fromtimestamp(self._window_wall, UTC).isoformat(timespec="seconds")
        self._window_start, self._window_wall = self._clock.now(), self._clock.wall()
        for key_id, count in uses.items():
            # By the key itself: its id is the actor.
            self._enqueue("key.use", key_id, tenants.get(key_id), None, "ok",
                          {"count": count, "since": since})

    def _roll_auth_failures(self) -> None:
        failures, self._auth_failures = self._auth_failures, {}
        for target, count in failures.items():
            self._enqueue("auth.failure", None, None, target, "denied", {"count": count})

    async def flush(self) -> int:
        """Write everything queued now (in batches); returns how many entries were written.

        Raises what the store raises; what was not written stays queued.
        """
        self._roll_auth_failures()
        written = 0
        async with self._write_lock:
            while self._pending:
                batch = list(itertools.islice(self._pending, self._batch_size))
                await self._appender.append(batch)
                for _ in batch:
                    self._pending.popleft()
                written += len(batch)
                self.written += len(batch)
                if self._written_metric is not None:
                    self._written_metric.inc(len(batch))
        return written

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit")

    async def _run(self) -> None:
        delay = self._interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if self._stopping:
                break
            if self._clock.now() - self._window_start >= self._window_s:
                self.roll_key_uses()
            try:
                await self.flush()
                delay = self._interval
            except Exception as exc:  # noqa: BLE001 - the store failing must not end the writer
                delay = min(max(delay * 2, self._interval), _MAX_BACKOFF_S)
                log.warning("audit log write failed; retrying",
                            extra={"error_type": type(exc).__name__, "pending": len(self._pending)})
        await self._final_flush()

    async def _final_flush(self) -> None:
        self.roll_key_uses()
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - report what is lost, never raise from shutdown
            log.error("audit log: final write failed; entries lost",
                      extra={"error_type": type(exc).__name__, "lost": len(self._pending)})

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the writer after it wrote what is queued (the current key-use window included)."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            await self._final_flush()
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.error("audit log: final write timed out; entries lost", extra={"lost": len(self._pending)})

