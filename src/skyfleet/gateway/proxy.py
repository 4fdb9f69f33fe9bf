"""Forward one OpenAI request to a replica: choose, send, retry once before the first byte.

* A request that fails before anything was sent to the client (connect error, engine 5xx,
  connection lost while a non-streaming reply was being produced, stream broken before its
  first event) is retried once on another replica.
* Usage is always requested from the engine (``stream_options.include_usage``) so that every
  request is metered; whoever consumes the stream decides whether the client sees that chunk.
* Every request ends in exactly one :class:`RequestRecord` for the observer (metrics, metering).
* Prefix-cache isolation: a client's ``cache_salt`` is always dropped; replicas whose engine takes
  one (vLLM, SGLang) get the tenant's (:mod:`skyfleet.gateway.cache_salt`), added while the body
  is serialised, so the parsed payload is never copied or re-parsed for it.

Consumers: :mod:`skyfleet.gateway.relay` relays chat/completions streams as they are; the
Responses API service reads the same :class:`UpstreamStream` and re-shapes its events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from skyfleet.clock import Clock
from skyfleet.engines.kvstate import NO_LEASE, KvLease, KvRouter
from skyfleet.errors import NoReplicaAvailableError, SkyfleetError, UpstreamError, from_upstream
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec
from skyfleet.gateway import cache_salt
from skyfleet.gateway.admission import ColdStartQueue
from skyfleet.gateway.cache_salt import CacheSalter
from skyfleet.gateway.context import RequestContext, RequestObserver, RequestRecord
from skyfleet.gateway.upstream import SSEStream, UpstreamClient
from skyfleet.routing.policy import RouteRequest, RoutingPolicy

DONE = b"data: [DONE]"


def usage_of(obj: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) tokens from an OpenAI object's ``usage``, if present.

    Cached tokens: ``usage.prompt_tokens_details.cached_tokens`` (OpenAI, vLLM, SGLang, llama.cpp
    since late 2025), else llama.cpp's own ``timings.cache_n`` (older builds).
    """
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = details.get("cached_tokens", 0)
    else:
        timings = obj.get("timings")
        cached = timings.get("cache_n", 0) if isinstance(timings, dict) else 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached or 0)


@dataclass(frozen=True, slots=True)
class UnaryReply:
    body: bytes  # what the client gets (model name already ours)
    data: dict[str, Any]  # the same, parsed
    replica_id: str


class Proxy:
    def __init__(
        self,
        *,
        registry: ReplicaRegistry,
        policy: RoutingPolicy,
        upstream: UpstreamClient,
        clock: Clock,
        observer: RequestObserver,
        salter: CacheSalter,
        kv: KvRouter | None = None,
        admission: ColdStartQueue | None = None,
    ) -> None:
        self._admission = admission  # gateway/admission.py: wait for a cold start (controller-managed models)
        self._registry = registry
        self._policy = policy
        self._upstream = upstream
        self._clock = clock
        self._observer = observer
        self._salter = salter
        self._kv = kv or KvRouter({})

    # -- shared -----------------------------------------------------------------------------
    def _pick(self, ctx: RequestContext, exclude: frozenset[str]) -> ReplicaSpec | None:
        snapshot = self._registry.snapshot(ctx.model, self._clock.now())
        request = RouteRequest(ctx.principal.tenant_id, ctx.model, session_key=ctx.session_key, exclude=exclude)
        choice = self._policy.choose(snapshot, request)
        entry = self._registry.get(choice) if choice is not None else None
        return entry.spec if entry is not None else None

    def record(self, ctx: RequestContext, **fields: Any) -> None:
        p = ctx.principal
        self._observer.on_finish(RequestRecord(
            request_id=ctx.request_id, tenant_id=p.tenant_id, tenant_name=p.tenant_name, key_id=p.key_id,
            model=ctx.model, route=ctx.route, stream=ctx.stream, started_wall=ctx.started_wall,
            duration_s=self._clock.now() - ctx.started, admission=ctx.admission, reservation=ctx.reservation,
            **fields,
        ))

    async def _admit(self, ctx: RequestContext) -> None:
        """A controller-managed model with no ready replica: wait (bounded) for one to start."""
        q = self._admission
        if q is None or not q.manages(ctx.model) or self._registry.ready_count(ctx.model) > 0:
            return
        try:
            await q.wait_for_replica(ctx.model)
        except SkyfleetError as exc:
            self.record(ctx, status="failed", http_status=exc.status, error_code=exc.code, attempts=1)
            raise

    def _no_replica(self, ctx: RequestContext) -> SkyfleetError:
        return NoReplicaAvailableError(f"no replica of '{ctx.model}' is ready; try again shortly")

    def _body_for(self, ctx: RequestContext, spec: ReplicaSpec, payload: dict[str, Any], lease: KvLease) -> bytes:
        """The body for ``spec``: its model name, the KV lease's fields, the tenant's cache salt if it takes one.

        ``payload`` no longer holds a client ``cache_salt`` (see :meth:`_strip`)."""
        payload["model"] = spec.upstream_model
        extra = lease.fields
        if spec.engine in cache_salt.SALTED_ENGINES:
            salt = self._salter.salt_for(ctx.principal)
            extra = {**extra, cache_salt.FIELD: salt} if extra else {cache_salt.FIELD: salt}
        return orjson.dumps({**payload, **extra} if extra else payload)

    @staticmethod
    def _strip(payload: dict[str, Any]) -> None:
        """Drop client-chosen fields the gateway owns: a client salt could join another tenant's cache."""
        payload.pop(cache_salt.FIELD, None)

    async def _lease(self, ctx: RequestContext, spec: ReplicaSpec) -> KvLease:
        return await self._kv.acquire(spec, ctx.principal.tenant_id, ctx.session_key)

    # -- non-streaming ----------------------------------------------------------------------
    async def unary(self, ctx: RequestContext, path: str, payload: dict[str, Any]) -> UnaryReply:
        self._strip(payload)
        await self._admit(ctx)
        exclude: frozenset[str] = frozenset()
        last = self._no_replica(ctx)
        for attempt in (1, 2):
            spec = self._pick(ctx, exclude)
            if spec is None:
                break
            self._registry.acquire(spec.id)
            lease, ok = NO_LEASE, False
            try:
                lease = await self._lease(ctx, spec)
                reply = await self._upstream.post_json(spec, path, self._body_for(ctx, spec, payload, lease))
                ok = reply.status < 400
            except UpstreamError as exc:
                if not exc.retryable:
                    self.record(ctx, status="failed", http_status=exc.status, replica_id=spec.id,
                                error_code=exc.code, attempts=attempt)
                    raise
                self._registry.mark_failed(spec.id, exc.message)
                exclude, last = exclude | {spec.id}, exc
                continue
            finally:
                self._registry.release(spec.id)
                lease.release(ok)
            if reply.status >= 500:
                exclude, last = exclude | {spec.id}, from_upstream(reply.status, reply.body)
                continue
            if reply.status >= 400:
                err = from_upstream(reply.status, reply.body)
                self.record(ctx, status="failed", http_status=err.status, replica_id=spec.id, error_code=err.code,
                            attempts=attempt)
                raise err
            try:
                data = orjson.loads(reply.body)
            except orjson.JSONDecodeError:
                exclude, last = exclude | {spec.id}, UpstreamError("the engine sent an unreadable reply")
                continue
            prompt, completion, cached = usage_of(data) or (0, 0, 0)
            body = reply.body
            if data.get("model") != ctx.model:
                data["model"] = ctx.model
                body = orjson.dumps(data)
            self.record(ctx, status="completed", http_status=200, replica_id=spec.id, prompt_tokens=prompt,
                        completion_tokens=completion, cached_tokens=cached, attempts=attempt)
            return UnaryReply(body, data, spec.id)
        self.record(ctx, status="failed", http_status=last.status, error_code=last.code, attempts=len(exclude) or 1)
        raise last

    # -- streaming --------------------------------------------------------------------------
    async def open_stream(self, ctx: RequestContext, path: str, payload: dict[str, Any]) -> UpstreamStream:
        """Open a stream and read its first event, retrying once elsewhere if that fails."""
        self._strip(payload)
        await self._admit(ctx)
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        exclude: frozenset[str] = frozenset()
        last = self._no_replica(ctx)
        for attempt in (1, 2):
            spec = self._pick(ctx, exclude)
            if spec is None:
                break
            self._registry.acquire(spec.id)
            lease = NO_LEASE
            opened: SSEStream | None = None
            body = b""
            try:
                lease = await self._lease(ctx, spec)
                body = self._body_for(ctx, spec, payload, lease)
                reply = await self._upstream.open_stream(spec, path, body)
                if not isinstance(reply, SSEStream):
                    err = from_upstream(reply.status, reply.body)
                    if reply.status >= 500:
                        raise UpstreamError(err.message)  # retry elsewhere, replica stays in routing
                    self._registry.release(spec.id)
                    lease.release(False)
                    self.record(ctx, status="failed", http_status=err.status, replica_id=spec.id,
                                error_code=err.code, attempts=attempt)
                    raise err
                opened = reply
                events = aiter(opened)
                first = await anext(events, None)
                if first is None:
                    raise UpstreamError("the engine closed the stream before its first event")
            except UpstreamError as exc:
                self._registry.release(spec.id)
                lease.release(False)
                if opened is not None:
                    opened.close()
                    self._registry.mark_failed(spec.id, exc.message)
                elif exc.retryable:
                    self._registry.mark_failed(spec.id, exc.message)
                exclude, last = exclude | {spec.id}, exc
                continue
            except BaseException:
                self._registry.release(spec.id)
                lease.release(False)
                if opened is not None:
                    opened.close()
                raise
            stream = UpstreamStream(self, ctx, spec, opened, events, first, attempt, lease)
            stream.prompt_estimate = len(body) // 4  # billed if the stream ends without the engine's usage
            return stream
        self.record(ctx, status="failed", http_status=last.status, error_code=last.code, attempts=len(exclude) or 1)
        raise last

    def _finish_stream(self, s: UpstreamStream, status: str, error: SkyfleetError | None) -> None:
        self._registry.release(s.spec.id)
        s.lease.release(status == "completed")
        # Without the engine's usage chunk (the client left early) the completion tokens are the token
        # events received (engines stream one token per event; see count_content), and the prompt is
        # estimated from the body's size (about 4 bytes a token): it was prefilled all the same.
        p, c, k = s.usage if s.usage is not None else (s.prompt_estimate, s.content_events, 0)
        self.record(s.ctx, status=status, http_status=200, replica_id=s.spec.id, prompt_tokens=p,
                    completion_tokens=c, cached_tokens=k, ttft_s=s.ttft_s, attempts=s.attempt,
                    error_code=error.code if error else None)


class UpstreamStream:
    """An open stream from a replica: its SSE events (raw bytes, first one included), its usage.

    Iterate it once. Call :meth:`finish` exactly when the consumer is done (idempotent): that
    releases the replica and emits the request's record.
    """

    __slots__ = ("_events", "_finished", "_first", "_proxy", "_stream", "attempt", "content_events", "ctx", "lease",
                 "prompt_estimate", "spec", "ttft_s", "usage")

    def __init__(self, proxy: Proxy, ctx: RequestContext, spec: ReplicaSpec, stream: SSEStream,
                 events: AsyncIterator[bytes], first: bytes, attempt: int, lease: KvLease) -> None:
        self.lease = lease
        self._proxy = proxy
        self._stream = stream
        self._events = events
        self._first: bytes | None = first
        self._finished = False
        self.ctx = ctx
        self.spec = spec
        self.attempt = attempt
        self.usage: tuple[int, int, int] | None = None
        self.content_events = 0
        self.prompt_estimate = 0
        self.ttft_s: float | None = proxy._clock.now() - ctx.started

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for ev in self._events:
            yield ev

    def is_usage_event(self, ev: bytes) -> bool:
        """True for the engine's final usage chunk (``choices: []``); records its usage."""
        if b'"usage"' not in ev or b'"choices":[]' not in ev:
            return False
        try:
            usage = usage_of(orjson.loads(ev[6:]))
        except orjson.JSONDecodeError:
            return False
        if usage is not None:
            self.usage = usage
        return True

    def count_content(self, ev: bytes) -> None:
        """Count ``ev`` if it carries a generated token: not the opening role chunk (``"content":null``
        or ``""``) nor a closing chunk with an empty delta (``{}``, ``"text":""``)."""
        if not (b'"content":null' in ev or b'"delta":{}' in ev or b'"content":""' in ev or b'"text":""' in ev):
            self.content_events += 1

    def finish(self, status: str, error: SkyfleetError | None = None) -> None:
        if not self._finished:
            self._finished = True
            self._stream.close()
            self._proxy._finish_stream(self, status, error)
