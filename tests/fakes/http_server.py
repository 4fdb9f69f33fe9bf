"""The HTTP plumbing the fake API servers share: a threaded HTTP/1.1 server on a free port that hands every
request to ``_dispatch``, optional TLS, and a ``stop`` that drops kept-alive connections as a dead server would.

Subclass it, call ``super().__init__(name=..., tls=...)`` and implement ``_dispatch(handler)``."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self


class FakeHttpServer:
    def __init__(self, *, name: str, tls: tuple[Path, Path] | None = None) -> None:
        self._name = name
        self._tls = tls
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[Any] = set()

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _handle(self) -> None:
                fake._dispatch(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = _handle

        connections = self._connections

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                connections.add(request)
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    connections.discard(request)

        server = Server(("127.0.0.1", 0), Handler)
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self._tls[0]), str(self._tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop the open (kept-alive) connections, as a dead server would."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for connection in list(self._connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self._tls is not None else "http"
        host = "localhost" if self._tls is not None else "127.0.0.1"
        return f"{scheme}://{host}:{self._server.server_address[1]}"
