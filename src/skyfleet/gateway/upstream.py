"""Pooled HTTP/1.1 connections to replicas (aiohttp), with transport errors mapped to ours.

This is the only module that knows aiohttp. Everything above it sees bytes, status codes and
:mod:`skyfleet.errors` exceptions. ``retryable`` on an error means the request certainly
produced nothing for the client yet, so the proxy may send it to another replica.

TLS: an ``https://`` replica is reached with the client context registered for its origin
(:meth:`UpstreamClient.use_tls`, built once per replica by :func:`client_tls_context`: TLS 1.2 or
newer, the replica's CA, the gateway's client certificate for mTLS). Requests, ``/slots`` calls,
health checks and metrics scrapes all go through it. ``http://`` replicas skip the lookup.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from skyfleet.errors import UpstreamConnectError, UpstreamError, UpstreamTimeoutError
from skyfleet.fleet.replica import ReplicaSpec

log = logging.getLogger("skyfleet.upstream")

#: Seconds an idle connection to a replica is kept: below the engines' own keep-alive (5 s).
_KEEPALIVE_S = 4.0
_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
_SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}


def client_tls_context(*, ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None,
                       verify: bool = True) -> ssl.SSLContext:
    """The context the gateway connects to one replica with. Blocking (reads files): call it off the loop.

    ``ca_file``: trust only this CA bundle (default: the system's CAs). ``cert_file``/``key_file``:
    present this client certificate (mTLS). ``verify=False`` skips certificate and host-name
    checks (encryption without authentication; the caller warns). Raises :class:`ssl.SSLError`
    or :class:`OSError` for unreadable or mismatched files.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _tls_reason(exc: BaseException) -> str | None:
    """The TLS failure behind a connection error (for the log), or None if it is not one."""
    found = None
    for e in (exc, getattr(exc, "certificate_error", None), getattr(exc, "os_error", None), exc.__cause__,
              exc.__context__):
        if isinstance(e, ssl.SSLError):
            if reason := getattr(e, "reason", None):
                return str(reason)  # e.g. CERTIFICATE_VERIFY_FAILED
            found = found or type(e).__name__
    if found is None and isinstance(exc, aiohttp.ClientSSLError):
        found = type(exc).__name__
    return found


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    status: int
    body: bytes


class SSEStream:
    """An open streaming response from a replica, yielding whole SSE events (bytes, no trailing blank line)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._buffer = b""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if b"\r" in chunk:
                    chunk = chunk.replace(b"\r\n", b"\n")
                buf = self._buffer + chunk if self._buffer else chunk
                start = 0
                while (end := buf.find(b"\n\n", start)) != -1:
                    yield buf[start:end]
                    start = end + 2
                self._buffer = buf[start:]
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError(f"the engine connection broke mid-stream ({type(exc).__name__})") from None
        except TimeoutError:
            raise UpstreamTimeoutError("the engine stopped sending") from None
        if self._buffer.strip():
            # The peer closed without finishing its last event: truncated.
            raise UpstreamError("the engine closed the stream mid-event")

    def close(self) -> None:
        self._response.close()


class UpstreamClient:
    def __init__(self, *, connect_timeout_s: float, request_timeout_s: float, pool_size: int) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._tls: dict[str, ssl.SSLContext] = {}  # origin -> context
        self._tls_warned: set[tuple[str, str]] = set()

    def use_tls(self, base_url: str, context: ssl.SSLContext) -> None:
        """Connect to ``base_url``'s origin (an https:// replica) with ``context``."""
        self._tls[_origin(base_url)] = context

    def _ssl(self, url: str) -> ssl.SSLContext | bool:
        if url.startswith("http://"):
            return True  # plain HTTP: aiohttp ignores it
        return self._tls.get(_origin(url), True)  # True: aiohttp's default (system CAs, verified)

    async def start(self) -> None:
        # An idle pooled connection is dropped before the engines drop it (llama.cpp's and uvicorn's (vLLM)
        # keep-alive is 5 s): reusing one the server is closing fails with ServerDisconnectedError.
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self._pool_size, keepalive_timeout=_KEEPALIVE_S, enable_cleanup_closed=False
        )
        timeout = aiohttp.ClientTimeout(
            total=self._request_timeout_s, sock_connect=self._connect_timeout_s, connect=self._connect_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        return self._session

    @staticmethod
    def _headers(spec: ReplicaSpec, base: dict[str, str]) -> dict[str, str]:
        if spec.api_key:
            return {**base, "Authorization": f"Bearer {spec.api_key}"}
        return base

    async def post_json(self, spec: ReplicaSpec, path: str, body: bytes) -> UpstreamReply:
        """POST and read the whole reply. Any transport failure is retryable: nothing was sent on."""
        try:
            try:
                return await self._post_read(spec, path, body)
            except aiohttp.ServerDisconnectedError:  # a pooled connection the server had just closed: a new one
                return await self._post_read(spec, path, body)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamConnectError(f"replica {spec.id} is unreachable ({type(exc).__name__})") from None
        except TimeoutError:
            raise UpstreamTimeoutError(f"replica {spec.id} did not answer in time") from None

    async def _post_read(self, spec: ReplicaSpec, path: str, body: bytes) -> UpstreamReply:
        async with self.session.post(spec.base_url + path, data=body, headers=self._headers(spec, _JSON),
                                     ssl=self._ssl(spec.base_url)) as r:
            return UpstreamReply(r.status, await r.read())

    async def open_stream(self, spec: ReplicaSpec, path: str, body: bytes) -> SSEStream | UpstreamReply:
        """POST a streaming request; return the open stream, or the whole reply if it is not a 200."""
        try:
            try:
                r = await self.session.post(spec.base_url + path, data=body, headers=self._headers(spec, _SSE),
                                            ssl=self._ssl(spec.base_url))
            except aiohttp.ServerDisconnectedError:  # a pooled connection the server had just closed: a new one
                r = await self.session.post(spec.base_url + path, data=body, headers=self._headers(spec, _SSE),
                                            ssl=self._ssl(spec.base_url))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamConnectError(f"replica {spec.id} is unreachable ({type(exc).__name__})") from None
        except TimeoutError:
            raise UpstreamTimeoutError(f"replica {spec.id} did not answer in time") from None
        if r.status != 200:
            try:
                data = await r.read()
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                data = b""
            finally:
                r.release()
            return UpstreamReply(r.status, data)
        return SSEStream(r)

    async def slot_action(self, spec: ReplicaSpec, slot: int, action: str, filename: str | None = None) -> bool:
        """llama.cpp ``POST /slots/{id}?action=save|restore|erase``; False if it did not happen."""
        body = {"filename": filename} if filename else {}
        try:
            async with self.session.post(f"{spec.base_url}/slots/{slot}", params={"action": action}, json=body,
                                         headers=self._headers(spec, _JSON), ssl=self._ssl(spec.base_url),
                                         timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            return False

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        """Small GETs for health checks and metrics scrapes."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s), ssl=self._ssl(url)) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            if not url.startswith("http://"):
                self._warn_tls(url, _tls_reason(exc) or type(exc).__name__)
            return 0, type(exc).__name__

    def _warn_tls(self, url: str, reason: str) -> None:
        """Log an https replica's failure once per (origin, reason): health checks repeat every interval.

        A certificate the gateway does not trust shows as its TLS reason; a replica that refuses the
        gateway's client certificate (TLS 1.3) usually just disconnects after the handshake."""
        key = (_origin(url), reason)
        if key not in self._tls_warned and len(self._tls_warned) < 1024:
            self._tls_warned.add(key)
            log.warning("https replica unreachable (TLS: certificate not trusted, or client certificate refused?)",
                        extra={"replica_url": key[0], "reason": reason})
