"""What the request path knows about one request, and what it reports when the request ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from skyfleet.iam.principal import Principal


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


class RequestObserver(Protocol):
    def on_finish(self, record: RequestRecord) -> None: ...
