"""skyfleet certs dev|client: a local CA and certificates for TLS / mTLS in development."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Certificates for TLS in development.", no_args_is_help=True)

_OUT = typer.Option("--out", "-o", help="Directory to write the files into.")


@app.command("dev")
def dev(
    out: Annotated[Path, _OUT] = Path(".skyfleet/certs"),
    host: Annotated[list[str] | None, typer.Option("--host", help="Names/IPs for the server certificate.")] = None,
    client: Annotated[list[str] | None, typer.Option(
        "--client", help="Also issue client-NAME.pem/.key with this common name (repeatable), e.g. for the "
        "gateway's mTLS to replicas.")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650)] = 365,
) -> None:
    """Create a new CA (ca.pem, ca.key), server.pem/server.key and client.pem/client.key (keys 0600)."""
    from skyfleet.iam.certs import make_dev_certs

    try:
        paths = make_dev_certs(out, hosts=tuple(host) if host else ("localhost", "127.0.0.1", "::1"), days=days,
                               clients=tuple(client or ()))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--client") from None
    files = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.client_cert, paths.client_key,
             *(p for pair in paths.clients.values() for p in pair)]
    typer.echo("wrote " + ", ".join(str(f) for f in files))
    typer.echo(f"serve with: skyfleet serve --tls-cert {paths.server_cert} --tls-key {paths.server_key}")


@app.command("client")
def client_cert(
    name: Annotated[str, typer.Argument(help="Common name of the client, also in the file names.")],
    out: Annotated[Path, _OUT] = Path(".skyfleet/certs"),
    days: Annotated[int, typer.Option(min=1, max=3650)] = 365,
) -> None:
    """Issue client-NAME.pem/.key from the CA that 'skyfleet certs dev' made in --out."""
    from skyfleet.iam.certs import add_client_cert

    try:
        cert, key = add_client_cert(out, name, days=days)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="NAME") from None
    except FileNotFoundError as exc:
        typer.echo(f"skyfleet: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {cert}, {key}")
