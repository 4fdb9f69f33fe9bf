"""The Responses API on top of chat completions: history from the store, generation by a replica,
the turn committed (durably) before the client is told it is complete."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from skyfleet.api.items import check_metadata, normalise_items, to_chat_messages
from skyfleet.api.responses.schema import CreateResponse
from skyfleet.cost.budget_gate import Reservation
from skyfleet.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError, SkyfleetError
from skyfleet.gateway.context import RequestContext
from skyfleet.gateway.proxy import UnaryReply, UpstreamStream, usage_of
from skyfleet.iam.principal import Principal
from skyfleet.runtime import Gateway

CHAT_PATH = "/v1/chat/completions"
_MAX_TRUNCATIONS = 8


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Turn:
    """Everything about one response being produced."""

    response_id: str
    message_id: str
    created_at: int
    body: CreateResponse
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    conversation_id: str | None
    session_id: str
    stored: bool
    metadata: dict[str, str]
    reservation: Reservation | None = None  # the budgets' (settled from the request's record)

    def chat_payload(self, stream: bool) -> dict[str, Any]:
        messages = to_chat_messages(self.history + self.input_items)
        if self.body.instructions:
            messages.insert(0, {"role": "system", "content": self.body.instructions})
        payload: dict[str, Any] = {"messages": messages, "stream": stream}
        for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p")):
            if (value := getattr(self.body, ours)) is not None:
                payload[theirs] = value
        return payload

    def drop_oldest_history(self) -> bool:
        """truncation="auto": forget the oldest quarter of the history (at least one item)."""
        if not self.history:
            return False
        self.history = self.history[max(1, len(self.history) // 4):]
        return True

    def output_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def response(self, *, status: str, text: str | None = None, usage: tuple[int, int, int] | None = None,
                 finish_reason: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = finish_reason == "length"
        if status == "completed" and incomplete:
            status = "incomplete"
        out = [self.output_item(text, "incomplete" if incomplete else "completed")] if text is not None else []
        body: dict[str, Any] = {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": b.model,
            "output": out, "parallel_tool_calls": False, "previous_response_id": b.previous_response_id,
            "conversation": {"id": self.conversation_id} if self.conversation_id else None,
            "temperature": b.temperature, "top_p": b.top_p, "tool_choice": "none", "tools": [],
            "truncation": b.truncation, "store": self.stored, "text": {"format": {"type": "text"}},
            "metadata": self.metadata, "user": b.user, "usage": None,
        }
        if usage is not None:
            prompt, completion, cached = usage
            body["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                             "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": prompt + completion}
        return body


class ResponsesService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # -- preparing a turn -------------------------------------------------------------------
    async def start_turn(self, principal: Principal, body: CreateResponse) -> Turn:
        gw = self.gw
        if body.previous_response_id and body.conversation is not None:
            raise InvalidRequestError("Use either 'previous_response_id' or 'conversation', not both.",
                                      param="conversation")
        if body.tools:
            raise InvalidRequestError("Tools are not supported by this deployment.", param="tools")
        if body.conversation is not None and not body.store:
            raise InvalidRequestError("A response in a conversation must be stored ('store': true).", param="store")
        models = gw.registry.models()
        if body.model not in models:
            raise ModelNotFoundError(body.model, [m for m in models if principal.may_use(m)])
        window = gw.registry.context_window(body.model)
        if window is not None and body.max_output_tokens is not None and body.max_output_tokens >= window:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {window} tokens; max_output_tokens="
                f"{body.max_output_tokens} leaves no room for the input.", param="max_output_tokens")
        input_items = normalise_items(body.input, "input")
        metadata = check_metadata(body.metadata)
        tenant = principal.tenant_id
        conversation_id = body.conversation_id
        history: list[dict[str, Any]] = []
        if body.previous_response_id:
            history = await gw.store.responses.history(tenant, body.previous_response_id)
        elif conversation_id:
            history = [r.item for r in await gw.store.conversations.all_items(tenant, conversation_id)]
        turn = Turn(response_id=new_id("resp"), message_id=new_id("msg"), created_at=int(time.time()), body=body,
                    input_items=input_items, history=history, conversation_id=conversation_id,
                    session_id="", stored=body.store, metadata=metadata)
        # Budgets: the worst case of the whole prompt (history included), before the turn is stored.
        turn.reservation = await gw.budgets.admit_payload(principal, body.model, turn.chat_payload(stream=False),
                                                          body.max_output_tokens, window)
        try:
            if body.store:
                rec = await gw.store.responses.begin(
                    tenant, model=body.model, conversation_id=conversation_id,
                    previous_response_id=body.previous_response_id, input_items=input_items,
                    body=turn.response(status="in_progress"), store=True)
                turn.response_id, turn.session_id = rec.id, rec.session_id
            else:
                turn.session_id = turn.response_id
        except BaseException:
            gw.budgets.cancel(turn.reservation)
            raise
        return turn

    def context(self, principal: Principal, turn: Turn, request_id: str) -> RequestContext:
        return RequestContext(
            request_id=request_id, principal=principal, route="responses", model=turn.body.model,
            stream=turn.body.stream, include_usage=True, started=self.gw.clock.now(),
            started_wall=self.gw.clock.wall(), session_key=turn.session_id, reservation=turn.reservation)

    # -- generating -------------------------------------------------------------------------
    async def _with_truncation(self, turn: Turn, call: Any) -> Any:
        for _ in range(_MAX_TRUNCATIONS):
            try:
                return await call()
            except ContextLengthExceededError as exc:
                if turn.body.truncation != "auto":
                    raise ContextLengthExceededError(
                        f"{exc.message} The conversation is longer than the model's context; set "
                        "'truncation': 'auto' to drop the oldest turns.", param="input") from None
                if not turn.drop_oldest_history():
                    raise
        raise ContextLengthExceededError("The input does not fit the model's context even after truncation.",
                                         param="input")

    async def generate(self, ctx: RequestContext, turn: Turn) -> dict[str, Any]:
        try:
            reply: UnaryReply = await self._with_truncation(
                turn, lambda: self.gw.proxy.unary(ctx, CHAT_PATH, turn.chat_payload(stream=False)))
        except SkyfleetError as exc:
            await self.fail(ctx.principal, turn, exc)
            raise
        except BaseException:
            self.gw.budgets.cancel(ctx.reservation)  # cancelled before a record settled it
            raise
        choice = (reply.data.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        usage = usage_of(reply.data) or (0, 0, 0)
        return await self.commit(ctx.principal, turn, text, usage, choice.get("finish_reason"))

    async def open_stream(self, ctx: RequestContext, turn: Turn) -> UpstreamStream:
        try:
            stream: UpstreamStream = await self._with_truncation(
                turn, lambda: self.gw.proxy.open_stream(ctx, CHAT_PATH, turn.chat_payload(stream=True)))
        except SkyfleetError as exc:
            await self.fail(ctx.principal, turn, exc)
            raise
        except BaseException:
            self.gw.budgets.cancel(ctx.reservation)
            raise
        return stream

    # -- finishing --------------------------------------------------------------------------
    async def commit(self, principal: Principal, turn: Turn, text: str, usage: tuple[int, int, int],
                     finish_reason: str | None) -> dict[str, Any]:
        """Persist the finished turn (one durable transaction) and return the response body."""
        body = turn.response(status="completed", text=text, usage=usage, finish_reason=finish_reason)
        if turn.stored:
            await self.gw.store.responses.complete(
                principal.tenant_id, turn.response_id, body=body, output_items=[turn.output_item(text)],
                input_tokens=usage[0], output_tokens=usage[1], cached_tokens=usage[2])
        return body

    async def fail(self, principal: Principal, turn: Turn, exc: SkyfleetError | None, *,
                   status: str = "failed") -> dict[str, Any]:
        error = {"code": exc.code or exc.type, "message": exc.message} if exc else None
        if turn.stored:
            await self.gw.store.responses.fail(principal.tenant_id, turn.response_id, status=status,  # type: ignore[arg-type]
                                               error=error)
        return turn.response(status=status, error=error)
