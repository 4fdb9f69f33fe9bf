"""skyfleet keys create|list|update|revoke"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from skyfleet.cli.audit import audited
from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

app = typer.Typer(help="API keys: shown once at creation, stored only as hashes.", no_args_is_help=True)

ModelOption = Annotated[list[str] | None, typer.Option(
    "--model", "-m", help="A model the key may use (repeat for several). Default: every model.")]
CidrOption = Annotated[list[str] | None, typer.Option(
    "--cidr", help="A client network the key may be used from, e.g. 10.0.0.0/8 (repeat). Default: anywhere.")]
ExpiresOption = Annotated[str | None, typer.Option(
    "--expires-at", help="When the key stops working: ISO 8601 with a timezone, e.g. 2030-01-01T00:00:00Z.")]
RpmOption = Annotated[int | None, typer.Option("--rpm", min=1, help="This key's requests per minute.")]
TpmOption = Annotated[int | None, typer.Option("--tpm", min=1, help="This key's tokens per minute.")]
NOTE = "gateways apply the change within auth_cache_ttl_s (revocation: within a second)"


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter("not an ISO 8601 date-time", param_hint="--expires-at") from None
    if parsed.tzinfo is None:
        raise typer.BadParameter("give a timezone, e.g. ...Z or +02:00", param_hint="--expires-at")
    return parsed


@app.command("create")
def create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant the key belongs to.")],
    role: Annotated[str, typer.Option(help="platform-admin, tenant-admin, member or read-only.")] = "member",
    name: Annotated[str | None, typer.Option(help="A label for listings.")] = None,
    model: ModelOption = None,
    cidr: CidrOption = None,
    expires_at: ExpiresOption = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    json: Annotated[bool, typer.Option("--json", help='Print {"key": ..., "tenant": ...}.')] = False,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it (once)."""
    when = _when(expires_at)
    plaintext, record = run_with_store(
        settings_or_exit(config), audited("key.create", lambda s: s.keys.create(
            tenant, role=role, name=name, expires_at=when, models=model or None, cidrs=cidr or None,
            rpm_limit=rpm, tpm_limit=tpm),
            lambda r: {"tenant_id": r[1].tenant_id, "target": r[1].id, "role": r[1].role})
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
    table = Table("id", "tenant", "role", "prefix", "name", "created", "revoked", "restrictions")
    for k in keys:
        limits = [f"models={','.join(k.models)}" if k.models is not None else "",
                  f"cidrs={','.join(k.cidrs)}" if k.cidrs is not None else "",
                  f"rpm={k.rpm_limit}" if k.rpm_limit else "", f"tpm={k.tpm_limit}" if k.tpm_limit else "",
                  f"expires={k.expires_at.isoformat(timespec='seconds')}" if k.expires_at else ""]
        table.add_row(k.id, k.tenant_name, k.role, k.prefix + "…", k.name or "",
                      k.created_at.isoformat(timespec="seconds"),
                      k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
                      " ".join(x for x in limits if x))
    Console().print(table)


@app.command("update")
def update(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")],
    role: Annotated[str | None, typer.Option(help="New role.")] = None,
    name: Annotated[str | None, typer.Option(help="New label.")] = None,
    model: ModelOption = None,
    all_models: Annotated[bool, typer.Option("--all-models", help="Lift the model allow-list.")] = False,
    cidr: CidrOption = None,
    any_address: Annotated[bool, typer.Option("--any-address", help="Lift the network allow-list.")] = False,
    expires_at: ExpiresOption = None,
    no_expiry: Annotated[bool, typer.Option("--no-expiry", help="The key never expires.")] = False,
    rpm: RpmOption = None,
    no_rpm: Annotated[bool, typer.Option("--no-rpm", help="Remove the key's own request limit.")] = False,
    tpm: TpmOption = None,
    no_tpm: Annotated[bool, typer.Option("--no-tpm", help="Remove the key's own token limit.")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the key as JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Change a key's role, label, allow-lists, expiry or limits (only what is given)."""
    changes: dict[str, Any] = {}
    for field, value, clear, flags in (
        ("models", model or None, all_models, "--model / --all-models"),
        ("cidrs", cidr or None, any_address, "--cidr / --any-address"),
        ("expires_at", _when(expires_at), no_expiry, "--expires-at / --no-expiry"),
        ("rpm_limit", rpm, no_rpm, "--rpm / --no-rpm"),
        ("tpm_limit", tpm, no_tpm, "--tpm / --no-tpm"),
    ):
        if value is not None and clear:
            raise typer.BadParameter(f"give one of {flags}")
        if value is not None or clear:
            changes[field] = value
    if role is not None:
        changes["role"] = role
    if name is not None:
        changes["name"] = name
    if not changes:
        raise typer.BadParameter("nothing to change")
    record = run_with_store(settings_or_exit(config), audited(
        "key.update", lambda s: s.keys.update(key_id, changes),
        lambda r: {"tenant_id": r.tenant_id, "target": r.id, "fields": ",".join(sorted(changes))}))
    if json:
        from skyfleet.api.admin.schema import key_json

        echo_json(key_json(record))
    else:
        typer.echo(f"updated {record.id} ({', '.join(sorted(changes))}); {NOTE}")


@app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")], config: ConfigOption = None) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    record = run_with_store(settings_or_exit(config), audited(
        "key.revoke", lambda s: s.keys.revoke(key_id), lambda r: {"tenant_id": r.tenant_id, "target": r.id}))
    typer.echo(f"revoked {record.id} ({record.prefix}…)")
