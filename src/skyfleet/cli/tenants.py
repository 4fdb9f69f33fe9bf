"""skyfleet tenants create|list|delete"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

app = typer.Typer(help="Tenants: the unit of isolation, billing and keys.", no_args_is_help=True)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits, '-' and '_'.")],
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Create a tenant."""
    tenant = run_with_store(settings_or_exit(config), lambda s: s.tenants.create(name))
    if json:
        from skyfleet.api.admin.schema import tenant_json

        echo_json(tenant_json(tenant))
    else:
        typer.echo(f"created tenant {tenant.name} ({tenant.id})")


@app.command("list")
def list_(
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False, config: ConfigOption = None
) -> None:
    """List tenants."""
    tenants = run_with_store(settings_or_exit(config), lambda s: s.tenants.list())
    if json:
        from skyfleet.api.admin.schema import tenant_json

        echo_json([tenant_json(t) for t in tenants])
        return
    table = Table("name", "id", "created")
    for t in tenants:
        table.add_row(t.name, t.id, t.created_at.isoformat(timespec="seconds"))
    Console().print(table)


@app.command("delete")
def delete(name: str, config: ConfigOption = None) -> None:
    """Delete a tenant and revoke all of its keys."""
    run_with_store(settings_or_exit(config), lambda s: s.tenants.delete(name))
    typer.echo(f"deleted tenant {name}; its keys are revoked")
