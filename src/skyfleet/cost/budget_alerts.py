"""Soft-limit alerts: a log line, and a webhook POST when ``budgets.webhook_url`` is set.

Fire and forget: :meth:`AlertSender.send` never blocks or raises; each POST has a short timeout
(``webhook_timeout_s``) and at most ``webhook_retries`` retries (backoff 0.5 s, doubling), and at
most :data:`MAX_PENDING` alerts are in flight (more are logged and dropped). The body holds ids,
the period and amounts only: never a key, a prompt or a completion.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from skyfleet.cost.budgets import BudgetDef, format_usd, period_window

log = logging.getLogger("skyfleet.budgets")

#: Alerts in flight at once; beyond that they are only logged.
MAX_PENDING = 64
EVENT = "budget.soft_limit_reached"


@dataclass(frozen=True, slots=True)
class Alert:
    budget: BudgetDef
    period_start: datetime
    spent_usd_micros: int
    soft_limit_usd_micros: int | None
    at: datetime

    def body(self) -> dict[str, Any]:
        b = self.budget
        _, end = period_window(b.period, self.period_start)
        soft = self.soft_limit_usd_micros
        return {
            "type": EVENT, "budget_id": b.id, "tenant_id": b.tenant_id, "key_id": b.key_id, "scope": b.scope,
            "period": b.period, "period_start": self.period_start.astimezone(UTC).isoformat(),
            "period_end": end.isoformat() if end is not None else None,
            "soft_limit_usd": format_usd(soft) if soft is not None else None, "soft_limit_usd_micros": soft,
            "spent_usd": format_usd(self.spent_usd_micros), "spent_usd_micros": self.spent_usd_micros,
            "hard_limit_usd_micros": b.hard_limit_usd_micros, "at": self.at.astimezone(UTC).isoformat(),
        }


class AlertSender:
    """Logs each alert and POSTs it to the webhook (if any) in the background."""

    def __init__(self, webhook_url: str | None, *, timeout_s: float, retries: int,
                 backoff_s: float = 0.5) -> None:
        self._url = webhook_url
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: Any = None
        self.sent = 0
        self.failed = 0

    def send(self, alert: Alert) -> None:
        b = alert.budget
        log.warning("budget soft limit reached", extra={
            "budget_id": b.id, "tenant_id": b.tenant_id, "key_id": b.key_id, "period": b.period,
            "spent_usd": format_usd(alert.spent_usd_micros),
            "soft_limit_usd": format_usd(alert.soft_limit_usd_micros) if alert.soft_limit_usd_micros is not None
            else None})
        if self._url is None:
            return
        if len(self._tasks) >= MAX_PENDING:
            log.warning("budget webhook dropped: too many in flight", extra={"budget_id": b.id})
            self.failed += 1
            return
        task = asyncio.get_running_loop().create_task(self._post(alert.body()), name="budget-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: dict[str, Any]) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        data = orjson.dumps(body)
        delay = self._backoff_s
        for attempt in range(self._retries + 1):
            try:
                async with self._session.post(self._url, data=data, headers={
                        "Content-Type": "application/json", "User-Agent": "skyfleet-budgets"}) as resp:
                    if resp.status < 300:
                        self.sent += 1
                        return
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__
            if attempt < self._retries:
                await asyncio.sleep(delay)  # backoff between retries, not synchronisation
                delay *= 2
        self.failed += 1
        log.warning("budget webhook failed", extra={"budget_id": body["budget_id"], "error": error,
                                                    "attempts": self._retries + 1})

    async def wait_idle(self, timeout_s: float) -> None:
        """Wait (bounded) for the alerts in flight: on shutdown, and in tests."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        await self.wait_idle(self._timeout_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
