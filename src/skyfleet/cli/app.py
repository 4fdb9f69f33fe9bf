"""The `skyfleet` command. Sub-command modules import their heavy dependencies lazily, so that
``skyfleet engine llama`` (one per replica process) starts quickly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skyfleet.cli import audit, authz, budgets, certs, engine, keyrotation, keys, sessions, tenants
from skyfleet.cli import cost as cost_cli
from skyfleet.cli import fleet as fleet_cli
from skyfleet.cli import k8s as k8s_cli
from skyfleet.cli import plan as plan_cli
from skyfleet.cli import profile as profile_cli
from skyfleet.cli import simulate as simulate_cli
from skyfleet.cli.common import ConfigOption

app = typer.Typer(
    help="skyfleet: run open LLMs for many tenants, cheap, private and stateful.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(tenants.app, name="tenants")
app.add_typer(keys.app, name="keys")
keyrotation.register(keys.app)  # keys rotate-kek | rotate-dek
app.add_typer(sessions.app, name="sessions")
app.add_typer(certs.app, name="certs")
app.add_typer(engine.app, name="engine")
app.add_typer(authz.app, name="authz")
app.add_typer(audit.app, name="audit")
app.add_typer(budgets.app, name="budgets")
app.add_typer(cost_cli.app, name="cost")
app.add_typer(k8s_cli.app, name="k8s")
app.command("profile")(profile_cli.profile)
app.add_typer(fleet_cli.app, name="fleet")
app.command("plan")(plan_cli.plan)
app.command("simulate")(simulate_cli.simulate)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Local llama.cpp replicas.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Private key of --tls-cert (PEM).")] = None,
    config: ConfigOption = None,
) -> None:
    """Start the gateway and its local llama.cpp replicas."""
    from skyfleet.cli.serve import serve as run

    run(host=host, port=port, replicas=replicas, config=config, tls_cert=tls_cert, tls_key=tls_key)


def main() -> None:
    app()



