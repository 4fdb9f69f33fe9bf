"""The simulated replica's HTTP side: a raw ASGI app (no framework on the hot path) and ``run``.

Routes::

    POST /v1/chat/completions   POST /v1/completions    (stream and non-stream)
    GET  /v1/models             GET  /health            GET  /metrics

Two modes:

* **timed** (default): every request goes through the replica's
  :class:`~skyfleet.engines.sim.model.SimModel`; the handler sleeps until the model says the
  request's next token (stream) or its completion (non-stream) is due, then asks again.
  Sleeps are capped at :data:`RESCHEDULE_S` (unless ``tpot_batch_slope`` is 0, when a running
  request's predicted times are exact), so when a finish shrinks the batch a sleeper learns
  of its earlier finish at most that late. A client that disconnects is cancelled in the
  model (its KV reservation freed) at once.
* **fast** (``fast=True``): no model, no sleeps, no tasks: parse, generate, answer.
  ``cached_tokens`` is always 0, the gauges show in-flight requests only, the latency
  histograms stay empty, and a stream is sent as one body. For measuring gateway overhead.

``cache_salt`` works as in vLLM (see :mod:`.protocol`); :attr:`SimApp.cache_salts` counts the
salts requests arrived with (``None``: no salt), so tests can check what a gateway sends.
:func:`run` serves HTTPS with ``tls_cert``/``tls_key``, and requires client certificates signed
by ``tls_client_ca`` (mTLS) when given.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

from skyfleet.clock import Clock, SystemClock
from skyfleet.engines.sim.metrics import SimMetrics
from skyfleet.engines.sim.model import ContextLengthError, RequestState, SimModel, SimRequest
from skyfleet.engines.sim.profile import SimProfile
from skyfleet.engines.sim.protocol import Codec, Job, Kind, parse_job, usage
from skyfleet.engines.sim.text import count_tokens, detokenize, generate, mix_seed
from skyfleet.errors import (
    ContextLengthExceededError,
    MethodNotAllowedError,
    RouteNotFoundError,
    SkyfleetError,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: longest a timed handler sleeps before asking the model again
RESCHEDULE_S = 0.05
#: distinct salts :attr:`SimApp.cache_salts` keeps count of (a test aid, not a leak in benchmarks)
_SALTS_KEPT = 256

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_METRICS_TYPE = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
_HEALTH_BODY = b'{"status":"ok"}'
_GENERATE_PATHS = {"/v1/chat/completions": Kind.CHAT, "/v1/completions": Kind.COMPLETION}
_GET_PATHS = frozenset({"/v1/models", "/health", "/metrics"})


class _ClientGone(Exception):
    pass


def _prompt_param(job: Job) -> str:
    return "messages" if job.kind is Kind.CHAT else "prompt"


async def _read_body(receive: Receive) -> bytes:
    msg = await receive()
    if msg["type"] != "http.request":
        raise _ClientGone
    body: bytes = msg.get("body", b"")
    if not msg.get("more_body"):
        return body
    parts = [body]
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            raise _ClientGone
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, content_type: tuple[bytes, bytes] = _JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [content_type, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _respond_error(send: Send, exc: SkyfleetError) -> None:
    body = exc.body_bytes()
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SimApp:
    """One simulated replica as an ASGI application."""

    def __init__(
        self,
        profile: SimProfile,
        *,
        model: str = "sim-model",
        fast: bool = False,
        seed: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.profile = profile
        self.model_name = model
        self.fast = fast
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.metrics = SimMetrics(model)
        self.model = SimModel(profile, self.clock, self.metrics)
        self._seed = seed
        self._codec = Codec(model)
        self._id_prefix = secrets.token_hex(4)
        self._next_id = 0
        self._inflight = 0
        self.cache_salts: Counter[str | None] = Counter()
        # with a batch-independent tpot, a running request's predicted times never move
        self._exact = profile.tpot_batch_slope == 0
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": int(self.clock.wall()),
                        "owned_by": "skyfleet-sim",
                        "root": model,
                        "max_model_len": profile.max_model_len,
                    }
                ],
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        kind = _GENERATE_PATHS.get(path)
        if kind is not None:
            if method != "POST":
                await _respond_error(send, MethodNotAllowedError(f"{method} is not allowed on {path}"))
                return
            try:
                job = parse_job(kind, await _read_body(receive), self.profile.default_max_tokens)
                if job.cache_salt in self.cache_salts or len(self.cache_salts) < _SALTS_KEPT:
                    self.cache_salts[job.cache_salt] += 1
                if self.fast:
                    await self._serve_fast(job, send)
                else:
                    await self._serve_timed(job, receive, send)
            except SkyfleetError as exc:
                await _respond_error(send, exc)
            except _ClientGone:
                pass
            return
        if path in _GET_PATHS:
            if method != "GET" and method != "HEAD":
                await _respond_error(send, MethodNotAllowedError(f"{method} is not allowed on {path}"))
            elif path == "/health":
                await _respond(send, 200, _HEALTH_BODY)
            elif path == "/v1/models":
                await _respond(send, 200, self._models_body)
            else:
                await _respond(send, 200, self.render_metrics(), _METRICS_TYPE)
            return
        await _respond_error(send, RouteNotFoundError(f"Unknown request URL: {method} {path}"))

    def render_metrics(self) -> bytes:
        if self.fast:
            return self.metrics.render(self._inflight, 0, 0.0)
        stats = self.model.stats()
        return self.metrics.render(stats.running, stats.waiting, stats.kv_usage)

    # -- generation ----------------------------------------------------------------------------

    def _new_id(self, kind: Kind) -> str:
        self._next_id += 1
        return f"{'chatcmpl' if kind is Kind.CHAT else 'cmpl'}-{self._id_prefix}{self._next_id:x}"

    def _generate(self, job: Job) -> tuple[bytes, str]:
        ignore_eos = job.ignore_eos or self.profile.ignore_eos
        seed = mix_seed(self._seed, job.seed)
        return generate(job.prompt, seed, self.profile.natural_tokens_max, job.max_tokens, ignore_eos)

    async def _serve_fast(self, job: Job, send: Send) -> None:
        prompt_tokens = count_tokens(job.prompt)
        limit = self.profile.max_model_len
        if prompt_tokens + job.max_tokens > limit:
            raise ContextLengthExceededError(
                str(ContextLengthError(prompt_tokens, job.max_tokens, limit)), param=_prompt_param(job)
            )
        ids, reason = self._generate(job)
        self._inflight += 1
        try:
            rid = self._new_id(job.kind)
            created = int(self.clock.wall())
            use = usage(prompt_tokens, len(ids), 0)
            if job.stream:
                frames = self._codec.stream(job.kind, rid, created)
                body = frames.tokens(ids) + frames.end(reason, use if job.include_usage else None)
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                await send({"type": "http.response.body", "body": body})
            else:
                await _respond(
                    send, 200, self._codec.response(job.kind, rid, created, detokenize(ids), reason, use)
                )
        finally:
            self._inflight -= 1
        self.metrics.served(prompt_tokens, len(ids), reason)

    async def _serve_timed(self, job: Job, receive: Receive, send: Send) -> None:
        ids, reason = self._generate(job)
        text = detokenize(ids)
        try:
            req = self.model.submit(
                job.prompt,
                max_tokens=job.max_tokens,
                target_tokens=len(ids),
                finish_reason=reason,
                output=text,
                cache_salt=job.cache_salt,
            )
        except ContextLengthError as exc:
            raise ContextLengthExceededError(str(exc), param=_prompt_param(job)) from None
        # after the body, the next message is the disconnect: watch for it
        gone = asyncio.ensure_future(receive())
        try:
            rid = self._new_id(job.kind)
            created = int(self.clock.wall())
            if job.stream:
                await self._stream_timed(job, req, ids, rid, created, gone, send)
                return
            while not req.done:
                if not await self._pause(req, gone, each_token=False):
                    return
            use = usage(req.prompt_tokens, len(ids), req.cached_tokens)
            await _respond(send, 200, self._codec.response(job.kind, rid, created, text, reason, use))
        finally:
            gone.cancel()
            if not req.done:
                self.model.cancel(req)

    async def _stream_timed(
        self,
        job: Job,
        req: SimRequest,
        ids: bytes,
        rid: str,
        created: int,
        gone: asyncio.Future[Any],
        send: Send,
    ) -> None:
        frames = self._codec.stream(job.kind, rid, created)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        sent = 0
        while True:
            n = self.model.poll(req)
            if n > sent:
                await send(
                    {"type": "http.response.body", "body": frames.tokens(ids[sent:n]), "more_body": True}
                )
                sent = n
            if req.done:
                break
            if not await self._pause(req, gone, each_token=True):
                return
        use = usage(req.prompt_tokens, len(ids), req.cached_tokens) if job.include_usage else None
        await send({"type": "http.response.body", "body": frames.end(req.finish_reason, use)})

    async def _pause(self, req: SimRequest, gone: asyncio.Future[Any], *, each_token: bool) -> bool:
        """Sleep towards ``req``'s next token (or its end), at most :data:`RESCHEDULE_S`.

        ``False`` if the client went away meanwhile.
        """
        at = self.model.next_update_at(req, each_token=each_token)
        if at is None:
            return True
        delay = at - self.clock.now()
        if not (self._exact and req.state is RequestState.RUNNING):
            delay = min(delay, RESCHEDULE_S)
        if delay >= RESCHEDULE_S:
            await asyncio.wait((gone,), timeout=delay)  # wakes early on a disconnect
        else:
            await asyncio.sleep(max(delay, 0.0))
        return not gone.done()


def build_app(profile: SimProfile, *, model: str = "sim-model", fast: bool = False, seed: int = 0) -> ASGIApp:
    """A simulated replica serving ``model`` with ``profile``'s timing (see the module docstring)."""
    return SimApp(profile, model=model, fast=fast, seed=seed)


def run(*, host: str, port: int, profile: SimProfile, model: str, fast: bool, seed: int = 0,
        tls_cert: Path | None = None, tls_key: Path | None = None, tls_client_ca: Path | None = None) -> None:
    """Serve a simulated replica until interrupted (uvicorn, uvloop, httptools, no access log).

    ``tls_cert``/``tls_key``: HTTPS (TLS 1.2 or newer: uvicorn's server context). ``tls_client_ca``:
    also require a client certificate signed by that CA (mTLS); a client without one is refused
    during the handshake.
    """
    import ssl

    import uvicorn

    if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
        raise ValueError("tls_cert and tls_key go together, and tls_client_ca needs them")
    tls: dict[str, Any] = {}
    if tls_cert is not None:
        tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
        if tls_client_ca is not None:
            tls |= {"ssl_ca_certs": str(tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    uvicorn.run(
        build_app(profile, model=model, fast=fast, seed=seed),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_keep_alive=30,
        **tls,
    )
