"""The OpenAI wire format, as cheaply as possible: request parsing and pre-serialised responses.

Requests are parsed with orjson into a small :class:`Job`. Responses are the shapes the
official ``openai`` SDK parses (``chat.completion``, ``chat.completion.chunk``,
``text_completion``). Stream chunks are assembled from bytes: a per-request prefix (id,
created, model) and a per-token tail pre-serialised once per app for each of the 256
vocabulary tokens, so a token chunk costs one concatenation. SSE framing is exactly
``data: {json}\\n\\n``, ending with ``data: [DONE]\\n\\n``.

Request fields honoured: ``messages`` / ``prompt``, ``max_tokens`` (or
``max_completion_tokens``), ``stream``, ``stream_options.include_usage``, ``seed``, ``n``
(1 only) and vLLM's ``ignore_eos`` and ``cache_salt`` (a non-empty string; mixed into the
prefix-cache block hashes, so only requests with the same salt share cached prefixes). Everything else (``temperature``, ``stop``, ``tools``,
``logprobs``, ``model``...) is accepted and ignored: the text depends on the prompt and seed
only, and the replica answers under its own model name whatever ``model`` says.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from skyfleet.engines.sim.text import VOCAB, PromptError, render_chat, render_prompt
from skyfleet.errors import InvalidJSONError, InvalidRequestError

DONE = b"data: [DONE]\n\n"
_OPEN_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'
_ROLE_TAIL = b'{"role":"assistant","content":""}' + _OPEN_TAIL


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"


@dataclass(frozen=True, slots=True)
class Job:
    """A parsed generation request."""

    kind: Kind
    prompt: str
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    seed: int | None
    cache_salt: str | None = None


def parse_job(kind: Kind, raw: bytes, default_max_tokens: int) -> Job:
    """Parse and validate a request body; raises an OpenAI-shaped 400 (:class:`InvalidRequestError`)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidJSONError("We could not parse the JSON body of your request.") from None
    if type(body) is not dict:
        raise InvalidJSONError("The request body must be a JSON object.")
    try:
        if kind is Kind.CHAT:
            if "messages" not in body:
                raise InvalidRequestError("you must provide a 'messages' parameter", param="messages")
            prompt = render_chat(body["messages"])
            max_tokens = body.get("max_completion_tokens")
            param = "max_completion_tokens"
            if max_tokens is None:
                max_tokens, param = body.get("max_tokens"), "max_tokens"
        else:
            if "prompt" not in body:
                raise InvalidRequestError("you must provide a 'prompt' parameter", param="prompt")
            prompt = render_prompt(body["prompt"])
            max_tokens, param = body.get("max_tokens"), "max_tokens"
    except PromptError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif type(max_tokens) is not int or max_tokens < 1:
        raise InvalidRequestError(f"'{param}' must be an integer of at least 1", param=param)
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
        raise InvalidRequestError("'seed' must be an integer", param="seed")
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (type(cache_salt) is not str or not cache_salt):
        raise InvalidRequestError("Parameter 'cache_salt' must be a non-empty string if provided.",
                                  param="cache_salt")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and type(options) is dict and options.get("include_usage") is True
    return Job(kind, prompt, max_tokens, stream, include_usage, body.get("ignore_eos") is True, seed, cache_salt)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class Codec:
    """Serialises one replica's responses; everything that does not vary per request is precomputed."""

    __slots__ = ("_chat_tails", "_model", "_model_json", "_text_tails")

    def __init__(self, model: str) -> None:
        self._model = model
        self._model_json = orjson.dumps(model)
        self._chat_tails = tuple(b'{"content":' + orjson.dumps(w) + b"}" + _OPEN_TAIL for w in VOCAB)
        self._text_tails = tuple(orjson.dumps(w) + _OPEN_TAIL for w in VOCAB)

    # -- whole responses ---------------------------------------------------------------------

    def response(
        self, kind: Kind, rid: str, created: int, text: str, finish_reason: str, use: dict[str, Any]
    ) -> bytes:
        if kind is Kind.CHAT:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return orjson.dumps(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self._model,
                "choices": [choice],
                "usage": use,
            }
        )

    # -- streams -----------------------------------------------------------------------------

    def stream(self, kind: Kind, rid: str, created: int) -> StreamFrames:
        obj = b"chat.completion.chunk" if kind is Kind.CHAT else b"text_completion"
        head = (
            b'data: {"id":"' + rid.encode() + b'","object":"' + obj + b'","created":'
            + str(created).encode() + b',"model":' + self._model_json + b","
        )  # fmt: skip
        if kind is Kind.CHAT:
            return StreamFrames(head, head + b'"choices":[{"index":0,"delta":', self._chat_tails, True)
        return StreamFrames(head, head + b'"choices":[{"index":0,"text":', self._text_tails, False)


class StreamFrames:
    """The SSE frames of one streamed response, as bytes."""

    __slots__ = ("_chat", "_head", "_prefix", "_started", "_tails")

    def __init__(self, head: bytes, prefix: bytes, tails: tuple[bytes, ...], chat: bool) -> None:
        self._head = head
        self._prefix = prefix
        self._tails = tails
        self._chat = chat
        self._started = False

    def tokens(self, ids: bytes) -> bytes:
        """One chunk per token (a chat stream opens with the ``role`` chunk)."""
        if not ids:
            return b""
        prefix, tails = self._prefix, self._tails
        frames = prefix + prefix.join([tails[i] for i in ids])
        if not self._started:
            self._started = True
            if self._chat:
                return prefix + _ROLE_TAIL + frames
        return frames

    def end(self, finish_reason: str, use: dict[str, Any] | None) -> bytes:
        """The chunk carrying ``finish_reason``, the usage chunk if asked for, and ``[DONE]``."""
        empty = b"{}" if self._chat else b'""'
        out = (
            self._prefix
            + empty
            + b',"logprobs":null,"finish_reason":"'
            + finish_reason.encode()
            + b'"}]}\n\n'
        )
        if use is not None:
            out += self._head + b'"choices":[],"usage":' + orjson.dumps(use) + b"}\n\n"
        return out + DONE
