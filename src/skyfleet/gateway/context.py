"""What the request path knows about one request, and what it reports when the request ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from skyfleet.iam.principal import Principal

if TYPE_CHECKING:
    from skyfleet.cost.budget_gate import Reservation
    from skyfleet.gateway.ratelimit import Admission


@dataclass(slots=True)
class RequestContext:
    request_id: str
    principal: Principal
    route: str  # "chat" | "completions"
    model: str
    stream: bool
    include_usage: bool
    started: float  # clock.now() at arrival
    started_wall: float
    session_key: str | None = None  # for session-affinity routing
    admission: Admission | None = None  # the rate limiter's charge (reconciled from the record)
    reservation: Reservation | None = None  # the budgets' reservation (settled from the record)


@dataclass(slots=True)
class RequestRecord:
    """One finished request. Metering, metrics and logs read this; it never holds text."""

    request_id: str
    tenant_id: str
    tenant_name: str
    key_id: str
    model: str
    route: str
    stream: bool
    status: str  # completed | failed | cancelled
    http_status: int
    replica_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    duration_s: float = 0.0
    started_wall: float = 0.0
    error_code: str | None = None
    attempts: int = 1
    extra: dict[str, str] = field(default_factory=dict)
    #: The rate limiter's charge for this request (not data: a handle the limiter reconciles).
    admission: Admission | None = field(default=None, repr=False, compare=False)
    #: The budgets' reservation for this request (a handle the budget gate settles, not data).
    reservation: Reservation | None = field(default=None, repr=False, compare=False)


class RequestObserver(Protocol):
    def on_finish(self, record: RequestRecord) -> None: ...


class CompositeObserver:
    """Hands each record to several observers, in order (the proxy takes one)."""

    __slots__ = ("_observers",)

    def __init__(self, *observers: RequestObserver) -> None:
        self._observers = observers

    def on_finish(self, record: RequestRecord) -> None:
        for observer in self._observers:
            observer.on_finish(record)
