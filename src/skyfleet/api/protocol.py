"""uvicorn's httptools protocol with a bound on the request head (URL + headers).

llhttp, as uvicorn drives it, accepts a request head of any size: a client can make the
gateway buffer megabytes of headers per connection. This protocol counts the head's bytes as the
parser delivers them and answers ``431`` (or ``414`` for the URL) with an OpenAI-shaped error as
soon as the bound is passed, then closes the connection.
"""

from __future__ import annotations

import sys
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from skyfleet.errors import InvalidRequestError

_REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _HeadTooLargeError(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    #: Largest accepted request head (request line + headers), in bytes; set by :func:`bounded_protocol`.
    max_head_bytes = 32 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.max_head_bytes:
            raise _HeadTooLargeError(414)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_head_bytes:
            raise _HeadTooLargeError(431)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this while handling the parser's error; httptools raises
        # HttpParserCallbackError with our exception as its context.
        exc = sys.exc_info()[1]
        while exc is not None and not isinstance(exc, _HeadTooLargeError):
            exc = exc.__cause__ or exc.__context__
        if exc is None:
            super().send_400_response(msg)
        else:
            self._refuse(exc.status)

    def _refuse(self, status: int) -> None:
        what = "URL" if status == 414 else "request headers"
        body = InvalidRequestError(
            f"The {what} exceed {self.max_head_bytes} bytes.", code="request_header_too_large").body_bytes()
        self.transport.write(b"".join([
            b"HTTP/1.1 ", str(status).encode(), b" ", _REASONS[status], b"\r\n",
            b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n", body,
        ]))
        self.transport.close()


def bounded_protocol(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bounding the request head at ``max_head_bytes``."""
    return type("BoundedHttpTools", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})

