"""skyfleet tenants create|list|delete"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

if TYPE_CHECKING:
    from skyfleet.state.repositories import Store

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
    """Delete a tenant: revoke its keys and destroy its data key (crypto-shredding)."""

    async def go(store: Store) -> None:
        tenant = await store.tenants.get(name)
        await store.tenants.delete(name)
        await store.keyring.shred(tenant.id)

    run_with_store(settings_or_exit(config), go, with_keys=True)
    typer.echo(f"deleted tenant {name}: its keys are revoked and its stored data can no longer be decrypted")


@app.command("retention")
def retention(
    name: str,
    days: Annotated[int | None, typer.Option(min=1, help="Keep conversations and responses this many days.")] = None,
    forever: Annotated[bool, typer.Option("--forever", help="Keep them until deleted.")] = False,
    config: ConfigOption = None,
) -> None:
    """Set how long a tenant's conversations and stored responses are kept."""
    if (days is None) == (not forever):
        raise typer.BadParameter("give exactly one of --days N or --forever")
    run_with_store(settings_or_exit(config), lambda s: s.tenants.set_retention(name, None if forever else days))
    typer.echo(f"retention of {name}: {'forever' if forever else f'{days} days'}")
