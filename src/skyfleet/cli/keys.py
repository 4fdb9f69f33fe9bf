"""skyfleet keys create|list|revoke"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

app = typer.Typer(help="API keys: shown once at creation, stored only as hashes.", no_args_is_help=True)


@app.command("create")
def create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant the key belongs to.")],
    role: Annotated[str, typer.Option(help="platform-admin, tenant-admin, member or read-only.")] = "member",
    name: Annotated[str | None, typer.Option(help="A label for listings.")] = None,
    json: Annotated[bool, typer.Option("--json", help='Print {"key": ..., "tenant": ...}.')] = False,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it (once)."""
    plaintext, record = run_with_store(
        settings_or_exit(config), lambda s: s.keys.create(tenant, role=role, name=name)
    )
    if json:
        echo_json({"key": plaintext, "tenant": record.tenant_name, "id": record.id, "role": record.role})
    else:
        typer.echo(plaintext)
        typer.echo(f"(key {record.id} for tenant {record.tenant_name}, role {record.role}; "
                   "it is not shown again)", err=True)


@app.command("list")
def list_(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t")] = None,
    json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
) -> None:
    """List keys (prefixes only)."""
    keys = run_with_store(settings_or_exit(config), lambda s: s.keys.list(tenant))
    if json:
        from skyfleet.api.admin.schema import key_json

        echo_json([key_json(k) for k in keys])
        return
    table = Table("id", "tenant", "role", "prefix", "name", "created", "revoked")
    for k in keys:
        table.add_row(k.id, k.tenant_name, k.role, k.prefix + "…", k.name or "",
                      k.created_at.isoformat(timespec="seconds"),
                      k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "")
    Console().print(table)


@app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")], config: ConfigOption = None) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    record = run_with_store(settings_or_exit(config), lambda s: s.keys.revoke(key_id))
    typer.echo(f"revoked {record.id} ({record.prefix}…)")
