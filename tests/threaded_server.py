"""Serve an ASGI app with uvicorn in a thread of the test process, on a free port, until the block ends."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn


@contextlib.contextmanager
def serve_in_thread(app: Any, *, ready_path: str = "/health", **config: Any) -> Iterator[str]:
    """Yield the base URL once ``ready_path`` answers 200 (polled, at most 10 s); stop the server after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    options = {"lifespan": "on", "access_log": False, "log_level": "warning", **config}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if httpx.get(f"{url}{ready_path}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server at {url} did not become ready"
            time.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
