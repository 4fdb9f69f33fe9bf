"""Pooled HTTP/1.1 connections to replicas (aiohttp), with transport errors mapped to ours.

This is the only module that knows aiohttp. Everything above it sees bytes, status codes and
:mod:`skyfleet.errors` exceptions. ``retryable`` on an error means the request certainly
produced nothing for the client yet, so the proxy may send it to another replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from skyfleet.errors import UpstreamConnectError, UpstreamError, UpstreamTimeoutError
from skyfleet.fleet.replica import ReplicaSpec

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
_SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}


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

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self._pool_size, keepalive_timeout=30, enable_cleanup_closed=False
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
            async with self.session.post(spec.base_url + path, data=body, headers=self._headers(spec, _JSON)) as r:
                return UpstreamReply(r.status, await r.read())
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamConnectError(f"replica {spec.id} is unreachable ({type(exc).__name__})") from None
        except TimeoutError:
            raise UpstreamTimeoutError(f"replica {spec.id} did not answer in time") from None

    async def open_stream(self, spec: ReplicaSpec, path: str, body: bytes) -> SSEStream | UpstreamReply:
        """POST a streaming request; return the open stream, or the whole reply if it is not a 200."""
        try:
            r = await self.session.post(spec.base_url + path, data=body, headers=self._headers(spec, _SSE))
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
                                         headers=self._headers(spec, _JSON),
                                         timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            return False

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        """Small GETs for health checks and metrics scrapes."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            return 0, type(exc).__name__
