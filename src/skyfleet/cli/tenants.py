"""skyfleet tenants create|list|update|retention|delete"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from skyfleet.cli.audit import audited
from skyfleet.cli.audit import record as audit_record
from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit
from skyfleet.engines.kvstate import delete_tenant_slot_files

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
    tenant = run_with_store(settings_or_exit(config), audited(
        "tenant.create", lambda s: s.tenants.create(name),
        lambda t: {"tenant_id": t.id, "target": t.id, "name": t.name}))
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
    table = Table("name", "id", "created", "retention", "rpm", "tpm", "shares public prefix")
    for t in tenants:
        table.add_row(t.name, t.id, t.created_at.isoformat(timespec="seconds"),
                      f"{t.retention_days} days" if t.retention_days else "forever",
                      str(t.rpm_limit or "default"), str(t.tpm_limit or "default"),
                      "yes" if t.share_public_prefix else "no")
    Console().print(table)


@app.command("delete")
def delete(name: str, config: ConfigOption = None) -> None:
    """Delete a tenant: revoke its keys and destroy its data key (crypto-shredding)."""

    settings = settings_or_exit(config)

    async def go(store: Store) -> None:
        tenant = await store.tenants.get(name)
        await store.tenants.delete(name)
        await store.keyring.shred(tenant.id)
        # its saved KV slots on this host (sealed with the shredded key, so unreadable already)
        files = await asyncio.to_thread(delete_tenant_slot_files, settings.data_dir.resolve() / "slots", tenant.id)
        await audit_record(store, "tenant.delete", tenant_id=tenant.id, target=tenant.id, name=name,
                           shredded=True, slot_files_deleted=files)

    run_with_store(settings, go, with_keys=True)
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
    run_with_store(settings_or_exit(config), audited(
        "tenant.retention", lambda s: s.tenants.set_retention(name, None if forever else days),
        lambda t: {"tenant_id": t.id, "target": t.id, "retention_days": t.retention_days}))
    typer.echo(f"retention of {name}: {'forever' if forever else f'{days} days'}")


@app.command("update")
def update(
    name: str,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute for the whole tenant.")] = None,
    default_rpm: Annotated[bool, typer.Option("--default-rpm", help="Back to the configured default rpm.")] = False,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute for the whole tenant.")] = None,
    default_tpm: Annotated[bool, typer.Option("--default-tpm", help="Back to the configured default tpm.")] = False,
    share_public_prefix: Annotated[bool | None, typer.Option(
        "--share-public-prefix/--no-share-public-prefix",
        help="Opt in to (or out of) sharing the public system-prompt prefix cache.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Change a tenant's limits or prefix-cache sharing (only what is given; retention: `tenants retention`)."""
    changes: dict[str, Any] = {}
    for field, value, default, flags in (("rpm_limit", rpm, default_rpm, "--rpm / --default-rpm"),
                                         ("tpm_limit", tpm, default_tpm, "--tpm / --default-tpm")):
        if value is not None and default:
            raise typer.BadParameter(f"give one of {flags}")
        if value is not None or default:
            changes[field] = value
    if share_public_prefix is not None:
        changes["share_public_prefix"] = share_public_prefix
    if not changes:
        raise typer.BadParameter("nothing to change")
    tenant = run_with_store(settings_or_exit(config), audited(
        "tenant.update", lambda s: s.tenants.update(name, changes),
        lambda t: {"tenant_id": t.id, "target": t.id, "fields": ",".join(sorted(changes))}))
    if json:
        from skyfleet.api.admin.schema import tenant_json

        echo_json(tenant_json(tenant))
    else:
        typer.echo(f"updated tenant {tenant.name} ({', '.join(sorted(changes))}); gateways apply it within "
                   "auth_cache_ttl_s")
