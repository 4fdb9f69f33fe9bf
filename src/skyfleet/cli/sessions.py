"""skyfleet sessions export: a tenant's conversations and stored responses, decrypted, as JSONL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from skyfleet.cli.common import ConfigOption, run_with_store, settings_or_exit

if TYPE_CHECKING:
    from skyfleet.state.repositories import Store

app = typer.Typer(help="Conversations and stored responses.", no_args_is_help=True)


@app.command("export")
def export(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant whose data to export.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: standard output).")] = None,
    config: ConfigOption = None,
) -> None:
    """Write every conversation (with its items) and stored response of a tenant, one JSON per line."""
    import orjson
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from skyfleet.state.conversations import export_tenant

    async def go(store: Store) -> int:
        t = await store.tenants.get(tenant)
        sink = await asyncio.to_thread(open, out, "wb") if out else sys.stdout.buffer
        count = 0
        try:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True,
                          console=Console(stderr=True)) as bar:
                task = bar.add_task("exporting", total=None)
                async for record in export_tenant(store.engine, store.keyring, t.id):
                    sink.write(orjson.dumps(record) + b"\n")
                    count += 1
                    bar.update(task, description=f"exported {count} records")
        finally:
            if out:
                sink.close()
            else:
                sink.flush()
        return count

    count = run_with_store(settings_or_exit(config), go, with_keys=True)
    typer.echo(f"exported {count} records of tenant {tenant}" + (f" to {out}" if out else ""), err=True)
