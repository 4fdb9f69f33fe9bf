"""ASGI responses that stream to the client while watching for it to go away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from skyfleet.errors import SkyfleetError
from skyfleet.gateway.proxy import DONE, UpstreamStream

if TYPE_CHECKING:
    from skyfleet.gateway.ratelimit import Admission

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def sse_headers(request_id: str, admission: Admission | None = None) -> list[tuple[bytes, bytes]]:
    """The stream's headers; with the rate limiter's x-ratelimit-* when a limit applies."""
    headers = [*_SSE_HEADERS, (b"x-request-id", request_id.encode())]
    return headers + admission.raw_headers() if admission is not None else headers


async def until_disconnect(receive: Any, work: Awaitable[None]) -> bool:
    """Run ``work`` unless the client disconnects first; True if it did (``work`` is cancelled then)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if not gone and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return gone


def error_event(err: SkyfleetError) -> bytes:
    return b"data: " + err.body_bytes() + b"\n\n"


class StreamRelay:
    """Relay chat/completions SSE events as the engine sent them.

    The usage chunk is passed on only if the client asked for it; a stream that breaks after its
    first event ends with an OpenAI-style ``error`` event (the SDK raises ``APIError``).
    """

    def __init__(self, stream: UpstreamStream) -> None:
        self._s = stream

    def _rewrite(self) -> Callable[[bytes], bytes] | None:
        upstream, ours = self._s.spec.upstream_model, self._s.ctx.model
        if upstream == ours:
            return None
        old, new = b'"model":' + orjson.dumps(upstream), b'"model":' + orjson.dumps(ours)
        return lambda ev: ev.replace(old, new, 1)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await until_disconnect(receive, self._relay(send))
        finally:
            self._s.finish("cancelled")  # a no-op when the relay finished the stream itself

    async def _relay(self, send: Any) -> None:
        s = self._s
        rewrite = self._rewrite()
        include_usage = s.ctx.include_usage
        headers = sse_headers(s.ctx.request_id, s.ctx.admission)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        error: SkyfleetError | None = None
        try:
            async for ev in s:
                if ev.startswith(DONE):
                    body = ev
                elif s.is_usage_event(ev):
                    if not include_usage:
                        continue
                    body = rewrite(ev) if rewrite else ev
                else:
                    s.count_content(ev)  # the tokens generated, billed if the client leaves before the usage
                    body = rewrite(ev) if rewrite else ev
                await send({"type": "http.response.body", "body": body + b"\n\n", "more_body": True})
        except SkyfleetError as exc:
            error = exc
            await send({"type": "http.response.body", "body": error_event(exc), "more_body": True})
        s.finish("failed" if error else "completed", error)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
