"""Streaming a response as typed Responses-API events, built from the engine's chat chunks.

Order: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., then the turn is committed to the
store (durably), and only then response.output_text.done, response.content_part.done,
response.output_item.done, response.completed. A failure ends with ``error`` and
``response.failed``; a client that leaves cancels the turn (stored as cancelled, never complete).
"""

from __future__ import annotations

from typing import Any

import orjson

from skyfleet.api.responses.service import ResponsesService, Turn
from skyfleet.errors import SkyfleetError
from skyfleet.gateway.context import RequestContext
from skyfleet.gateway.proxy import DONE, UpstreamStream
from skyfleet.gateway.relay import sse_headers, until_disconnect


class ResponseEventStream:
    def __init__(self, service: ResponsesService, ctx: RequestContext, turn: Turn, upstream: UpstreamStream) -> None:
        self._service = service
        self._ctx = ctx
        self._turn = turn
        self._up = upstream
        self._seq = 0
        self._committed = False

    async def _event(self, send: Any, type_: str, **fields: Any) -> None:
        data = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        body = b"event: " + type_.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": True})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            gone = await until_disconnect(receive, self._run(send))
        finally:
            self._up.finish("cancelled")  # a no-op if the stream already finished
        if gone and not self._committed:
            await self._service.fail(self._ctx.principal, self._turn, None, status="cancelled")

    async def _run(self, send: Any) -> None:
        turn, up = self._turn, self._up
        item_id = turn.message_id
        headers = sse_headers(self._ctx.request_id, self._ctx.admission)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._event(send, "response.created", response=turn.response(status="in_progress"))
        await self._event(send, "response.in_progress", response=turn.response(status="in_progress"))
        await self._event(send, "response.output_item.added", output_index=0,
                          item={**turn.output_item("", "in_progress"), "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await self._event(send, "response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                          part=part)
        pieces: list[str] = []
        finish_reason = None
        try:
            async for ev in up:
                if ev.startswith(DONE) or up.is_usage_event(ev):
                    continue
                chunk = orjson.loads(ev[6:]) if ev.startswith(b"data: ") else {}
                for choice in chunk.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        up.content_events += 1
                        pieces.append(delta)
                        await self._event(send, "response.output_text.delta", item_id=item_id, output_index=0,
                                          content_index=0, delta=delta, logprobs=[])
                    finish_reason = choice.get("finish_reason") or finish_reason
        except (SkyfleetError, orjson.JSONDecodeError) as exc:
            err = exc if isinstance(exc, SkyfleetError) else SkyfleetError("the engine sent an unreadable event")
            up.finish("failed", err)
            failed = await self._service.fail(self._ctx.principal, turn, err)
            self._committed = True  # settled (as failed); never complete
            await self._event(send, "error", code=err.code, message=err.message, param=None)
            await self._event(send, "response.failed", response=failed)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        up.finish("completed")
        text = "".join(pieces)
        usage = up.usage or (0, up.content_events, 0)
        body = await self._service.commit(self._ctx.principal, turn, text, usage, finish_reason)
        self._committed = True
        item = body["output"][0]
        await self._event(send, "response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                          text=text, logprobs=[])
        await self._event(send, "response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                          part=item["content"][0])
        await self._event(send, "response.output_item.done", output_index=0, item=item)
        await self._event(send, "response.completed", response=body)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
