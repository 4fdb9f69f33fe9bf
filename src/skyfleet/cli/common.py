"""Shared CLI plumbing: settings, the store, error reporting."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from skyfleet.config import ConfigError, Settings, load_settings
from skyfleet.errors import SkyfleetError

if TYPE_CHECKING:
    from skyfleet.state.repositories import Store

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (also: SKYFLEET_CONFIG).")
]


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        typer.echo(f"skyfleet: {exc}", err=True)
        raise typer.Exit(2) from None


def run_with_store(settings: Settings, fn: Callable[[Store], Awaitable[T]], *, with_keys: bool = False) -> T:
    """Open the store (with the encryption keys when ``with_keys``), run ``fn``, close it."""
    from skyfleet.state.repositories import Store

    async def go() -> T:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        provider = None
        if with_keys:
            from skyfleet.crypto import open_key_provider

            provider = await asyncio.to_thread(open_key_provider, settings)
        store = await Store.open(settings.database_url_value, key_provider=provider)
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except SkyfleetError as exc:
        typer.echo(f"skyfleet: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except ConfigError as exc:  # e.g. the key provider's settings or key file
        typer.echo(f"skyfleet: {exc}", err=True)
        raise typer.Exit(2) from None


def echo_json(data: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
