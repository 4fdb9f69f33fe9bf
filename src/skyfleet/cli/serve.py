"""skyfleet serve: the gateway, with the local replicas it supervises."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
import uvicorn

from skyfleet.api.app import build_app
from skyfleet.api.protocol import bounded_protocol
from skyfleet.cli.common import settings_or_exit
from skyfleet.config import ConfigError, Settings
from skyfleet.errors import SkyfleetError
from skyfleet.observability.logging import configure_logging
from skyfleet.runtime import Gateway

log = logging.getLogger("skyfleet.serve")


class _Server(uvicorn.Server):
    """uvicorn's server, which also stops admitting new requests the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, gw: Gateway) -> None:
        super().__init__(config)
        self._gw = gw

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.config.ssl_certfile:
            # Idle keep-alive connections have nothing to drain, but over TLS a graceful close
            # waits for the client's close_notify (up to 30 s) and so holds the whole shutdown.
            # Abort them; connections with a request in flight still drain as usual.
            for conn in list(self.server_state.connections):
                cycle = getattr(conn, "cycle", None)
                transport = getattr(conn, "transport", None)
                if transport is not None and (cycle is None or cycle.response_complete):
                    transport.abort()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        self._gw.stop_accepting()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after shutdown, which would end the process before the
        # replicas are stopped; we only flag the exit and let `_serve` finish its clean-up.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def bootstrap(gw: Gateway) -> None:
    """First start: a `default` tenant with a member key and an admin key, printed once."""
    if not gw.settings.bootstrap or await gw.store.tenants.list():
        return
    tenant = await gw.store.tenants.create("default")
    member, _ = await gw.store.keys.create(tenant.name, role="member", name="bootstrap")
    admin, _ = await gw.store.keys.create(tenant.name, role="platform-admin", name="bootstrap-admin")
    url = f"http://{gw.settings.host}:{gw.settings.port}"
    sys.stdout.write(
        "\n"
        "skyfleet: first start, created tenant 'default'. These keys are shown ONCE (stored only as hashes):\n"
        f"  API key   (member):         {member}\n"
        f"  Admin key (platform-admin): {admin}\n\n"
        "Try it:\n"
        f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer {member}' \\\n"
        "    -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{gw.settings.local.model_name}\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'\n\n"
    )
    sys.stdout.flush()


async def _serve(settings: Settings, sock: socket.socket) -> None:
    gw = await Gateway.create(settings)
    await bootstrap(gw)
    app = build_app(gw, manage_lifecycle=False)
    config = uvicorn.Config(
        app, loop="none", http=bounded_protocol(settings.max_header_bytes), lifespan="off", access_log=False, log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None, timeout_keep_alive=30,
        # uvicorn's server context is PROTOCOL_TLS_SERVER: TLS 1.2 is the minimum version.
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
    server = _Server(config, gw)
    await gw.start()
    try:
        ready = await gw.wait_ready(settings.local.start_timeout_s)
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise stall the event loop for milliseconds.
        gc.collect()
        gc.freeze()
        log.info("gateway listening", extra={"address": f"http://{settings.host}:{sock.getsockname()[1]}",
                                              "ready": ready, "models": gw.registry.models()})
        await server.serve(sockets=[sock])
    finally:
        log.info("stopping replicas")
        await gw.stop()


def serve(*, host: str | None, port: int | None, replicas: int | None, config: Path | None,
          tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
    """Start the gateway and its local llama.cpp replicas (blocks until SIGTERM/SIGINT)."""
    overrides: dict[str, object] = {"host": host, "port": port, "tls_cert": tls_cert, "tls_key": tls_key}
    settings = settings_or_exit(config, **overrides)
    if replicas is not None:
        settings = settings.model_copy(update={"local": settings.local.model_copy(update={"replicas": replicas})})
    configure_logging(settings.log_level)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        typer.echo(f"skyfleet: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    sock.listen(2048)
    import uvloop

    try:
        uvloop.run(_serve(settings, sock))
    except SkyfleetError as exc:
        typer.echo(f"skyfleet: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except ConfigError as exc:  # found at start-up (e.g. a TLS file that does not load)
        typer.echo(f"skyfleet: configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
