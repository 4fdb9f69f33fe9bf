"""skyfleet certs dev: a local CA and certificates for TLS / mTLS in development."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Certificates for TLS in development.", no_args_is_help=True)


@app.command("dev")
def dev(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the files into.")] = Path(
        ".skyfleet/certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="Names/IPs for the server certificate.")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650)] = 365,
) -> None:
    """Create ca.pem, server.pem/server.key and client.pem/client.key (keys 0600)."""
    from skyfleet.iam.certs import make_dev_certs

    paths = make_dev_certs(out, hosts=tuple(host) if host else ("localhost", "127.0.0.1", "::1"), days=days)
    typer.echo(f"wrote {paths.ca_cert}, {paths.server_cert}, {paths.server_key}, {paths.client_cert}, "
               f"{paths.client_key}")
    typer.echo(f"serve with: skyfleet serve --tls-cert {paths.server_cert} --tls-key {paths.server_key}")
