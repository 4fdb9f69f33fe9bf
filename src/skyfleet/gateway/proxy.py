"""Forward one OpenAI request to a replica: choose, send, retry once before the first byte, relay.

* A request that fails before anything was sent to the client (connect error, engine 5xx,
  connection lost while a non-streaming reply was being produced, stream broken before its
  first event) is retried once on another replica.
* A stream that breaks after its first event ends with an OpenAI-style ``error`` event (the
  ``openai`` SDK raises ``APIError`` on it), never a silent truncation.
* Usage is always requested from the engine (``stream_options.include_usage``) so that every
  request is metered; the usage chunk is passed on only when the client asked for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from skyfleet.clock import Clock
from skyfleet.errors import (
    NoReplicaAvailableError,
    SkyfleetError,
    UpstreamError,
    from_upstream,
)
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec
from skyfleet.gateway.context import RequestContext, RequestObserver, RequestRecord
from skyfleet.gateway.upstream import SSEStream, UpstreamClient
from skyfleet.routing.policy import RouteRequest, RoutingPolicy

_DONE = b"data: [DONE]"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _usage_of(obj: dict[str, Any]) -> tuple[int, int, int] | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0)


class Proxy:
    def __init__(
        self,
        *,
        registry: ReplicaRegistry,
        policy: RoutingPolicy,
        upstream: UpstreamClient,
        clock: Clock,
        observer: RequestObserver,
    ) -> None:
        self._registry = registry
        self._policy = policy
        self._upstream = upstream
        self._clock = clock
        self._observer = observer

    # -- choosing ---------------------------------------------------------------------------
    def _pick(self, ctx: RequestContext, exclude: frozenset[str]) -> ReplicaSpec | None:
        snapshot = self._registry.snapshot(ctx.model, self._clock.now())
        choice = self._policy.choose(snapshot, RouteRequest(ctx.principal.tenant_id, ctx.model, exclude=exclude))
        entry = self._registry.get(choice) if choice is not None else None
        return entry.spec if entry is not None else None

    def _record(self, ctx: RequestContext, **fields: Any) -> RequestRecord:
        p = ctx.principal
        return RequestRecord(
            request_id=ctx.request_id,
            tenant_id=p.tenant_id,
            tenant_name=p.tenant_name,
            key_id=p.key_id,
            model=ctx.model,
            route=ctx.route,
            stream=ctx.stream,
            started_wall=ctx.started_wall,
            duration_s=self._clock.now() - ctx.started,
            **fields,
        )

    @staticmethod
    def _body_for(spec: ReplicaSpec, payload: dict[str, Any]) -> bytes:
        payload["model"] = spec.upstream_model
        return orjson.dumps(payload)

    # -- non-streaming ----------------------------------------------------------------------
    async def unary(self, ctx: RequestContext, path: str, payload: dict[str, Any]) -> bytes:
        exclude: frozenset[str] = frozenset()
        last: SkyfleetError = NoReplicaAvailableError(f"no replica of '{ctx.model}' is ready; try again shortly")
        for attempt in (1, 2):
            spec = self._pick(ctx, exclude)
            if spec is None:
                break
            self._registry.acquire(spec.id)
            try:
                reply = await self._upstream.post_json(spec, path, self._body_for(spec, payload))
            except UpstreamError as exc:
                if not exc.retryable:
                    self._observer.on_finish(self._record(ctx, status="failed", http_status=exc.status,
                                                          replica_id=spec.id, error_code=exc.code, attempts=attempt))
                    raise
                self._registry.mark_failed(spec.id, exc.message)
                exclude, last = exclude | {spec.id}, exc
                continue
            finally:
                self._registry.release(spec.id)
            if reply.status >= 500:
                exclude, last = exclude | {spec.id}, from_upstream(reply.status, reply.body)
                continue
            if reply.status >= 400:
                err = from_upstream(reply.status, reply.body)
                self._observer.on_finish(self._record(ctx, status="failed", http_status=err.status,
                                                      replica_id=spec.id, error_code=err.code, attempts=attempt))
                raise err
            try:
                data = orjson.loads(reply.body)
            except orjson.JSONDecodeError:
                exclude, last = exclude | {spec.id}, UpstreamError("the engine sent an unreadable reply")
                continue
            usage = _usage_of(data) or (0, 0, 0)
            body = reply.body
            if spec.upstream_model != ctx.model or data.get("model") != ctx.model:
                data["model"] = ctx.model
                body = orjson.dumps(data)
            self._observer.on_finish(self._record(
                ctx, status="completed", http_status=200, replica_id=spec.id, prompt_tokens=usage[0],
                completion_tokens=usage[1], cached_tokens=usage[2], attempts=attempt))
            return body
        self._observer.on_finish(self._record(ctx, status="failed", http_status=last.status, error_code=last.code,
                                              attempts=len(exclude) or 1))
        raise last

    # -- streaming --------------------------------------------------------------------------
    async def stream(self, ctx: RequestContext, path: str, payload: dict[str, Any]) -> StreamRelay:
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        exclude: frozenset[str] = frozenset()
        last: SkyfleetError = NoReplicaAvailableError(f"no replica of '{ctx.model}' is ready; try again shortly")
        for attempt in (1, 2):
            spec = self._pick(ctx, exclude)
            if spec is None:
                break
            self._registry.acquire(spec.id)
            opened = None
            try:
                opened = await self._upstream.open_stream(spec, path, self._body_for(spec, payload))
                if not isinstance(opened, SSEStream):
                    err = from_upstream(opened.status, opened.body)
                    if opened.status >= 500:
                        exclude, last = exclude | {spec.id}, err
                        self._registry.release(spec.id)
                        continue
                    self._registry.release(spec.id)
                    self._observer.on_finish(self._record(ctx, status="failed", http_status=err.status,
                                                          replica_id=spec.id, error_code=err.code, attempts=attempt))
                    raise err
                events = aiter(opened)
                first = await anext(events, None)
                if first is None:
                    raise UpstreamError("the engine closed the stream before its first event", code=None)
            except UpstreamError as exc:
                self._registry.release(spec.id)
                if isinstance(opened, SSEStream):
                    opened.close()
                self._registry.mark_failed(spec.id, exc.message)
                exclude, last = exclude | {spec.id}, exc
                continue
            except BaseException:
                self._registry.release(spec.id)
                if isinstance(opened, SSEStream):
                    opened.close()
                raise
            return StreamRelay(self, ctx, spec, opened, events, first, attempt)
        self._observer.on_finish(self._record(ctx, status="failed", http_status=last.status, error_code=last.code,
                                              attempts=len(exclude) or 1))
        raise last

    def _finish_stream(self, relay: StreamRelay, status: str, error: SkyfleetError | None) -> None:
        """Called exactly once per relayed stream (by :meth:`StreamRelay._done`)."""
        self._registry.release(relay.spec.id)
        # Without the engine's usage chunk (the client left early), count the relayed events:
        # engines send one event per generated token.
        p, c, k = relay.usage if relay.usage is not None else (0, relay.content_events, 0)
        self._observer.on_finish(self._record(
            relay.ctx, status=status, http_status=200, replica_id=relay.spec.id, prompt_tokens=p,
            completion_tokens=c, cached_tokens=k, ttft_s=relay.ttft_s, attempts=relay.attempt,
            error_code=error.code if error else None))


def _error_event(err: SkyfleetError) -> bytes:
    return b"data: " + err.body_bytes() + b"\n\n"


class StreamRelay:
    """An ASGI response that relays SSE events from a replica to the client."""

    __slots__ = (
        "_events",
        "_finished",
        "_first",
        "_proxy",
        "_stream",
        "attempt",
        "content_events",
        "ctx",
        "headers",
        "spec",
        "ttft_s",
        "usage",
    )

    def __init__(self, proxy: Proxy, ctx: RequestContext, spec: ReplicaSpec, stream: SSEStream,
                 events: AsyncIterator[bytes], first: bytes, attempt: int) -> None:
        self._proxy = proxy
        self.ctx = ctx
        self.spec = spec
        self._stream = stream
        self._events = events
        self._first = first
        self.attempt = attempt
        self.usage: tuple[int, int, int] | None = None
        self.content_events = 0
        self.ttft_s: float | None = proxy._clock.now() - ctx.started
        self.headers: list[tuple[bytes, bytes]] = [*_SSE_HEADERS, (b"x-request-id", ctx.request_id.encode())]
        self._finished = False

    def _done(self, status: str, error: SkyfleetError | None) -> None:
        if not self._finished:
            self._finished = True
            self._stream.close()
            self._proxy._finish_stream(self, status, error)

    def _rewrite(self) -> Callable[[bytes], bytes] | None:
        upstream, ours = self.spec.upstream_model, self.ctx.model
        if upstream == ours:
            return None
        old, new = b'"model":' + orjson.dumps(upstream), b'"model":' + orjson.dumps(ours)
        return lambda ev: ev.replace(old, new, 1)

    def _is_usage_event(self, ev: bytes) -> bool:
        if b'"usage"' not in ev or b'"choices":[]' not in ev:
            return False
        try:
            usage = _usage_of(orjson.loads(ev[6:]))
        except orjson.JSONDecodeError:
            return False
        if usage is not None:
            self.usage = usage
        return True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        relay = asyncio.ensure_future(self._relay(send))
        watcher = asyncio.ensure_future(self._watch_disconnect(receive))
        try:
            await asyncio.wait((relay, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not relay.done():
                relay.cancel()  # the client went away: stop relaying; closing makes the engine stop too
            await asyncio.gather(relay, watcher, return_exceptions=True)
            self._done("cancelled", None)

    @staticmethod
    async def _watch_disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _relay(self, send: Any) -> None:
        rewrite = self._rewrite()
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        ev: bytes | None = self._first
        error: SkyfleetError | None = None
        try:
            while ev is not None:
                if ev.startswith(_DONE):
                    await send({"type": "http.response.body", "body": ev + b"\n\n", "more_body": True})
                elif not self._is_usage_event(ev):
                    self.content_events += 1
                    await send({"type": "http.response.body",
                                "body": (rewrite(ev) if rewrite else ev) + b"\n\n", "more_body": True})
                elif self.ctx.include_usage:
                    await send({"type": "http.response.body",
                                "body": (rewrite(ev) if rewrite else ev) + b"\n\n", "more_body": True})
                ev = await anext(self._events, None)
        except SkyfleetError as exc:
            error = exc
            await send({"type": "http.response.body", "body": _error_event(exc), "more_body": True})
        self._done("failed" if error else "completed", error)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
