"""skyfleet audit verify|head|list; and :func:`audited`, how the other commands record what they change.

The chain proves integrity only relative to a head you trust: someone with write access to the
database can rewrite the newest entries (or drop them) and re-hash the rest consistently. Store
``skyfleet audit head`` somewhere they cannot write (a ticket, another system, on a schedule) and
pass it back with ``skyfleet audit verify --anchor SEQ:HASH``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

if TYPE_CHECKING:
    from skyfleet.audit.chain import Anchor
    from skyfleet.state.audit import AuditQuery
    from skyfleet.state.repositories import Store

T = TypeVar("T")

#: The actor of every entry the CLI writes (it holds no key: whoever runs it has database access).
CLI_ACTOR = "cli"
#: Logs longer than this get a progress bar (on a terminal).
_PROGRESS_FROM = 20_000

app = typer.Typer(help="The audit log: append-only and hash-chained.", no_args_is_help=True)


async def record(store: Store, action: str, *, tenant_id: str | None = None, target: str | None = None,
                 outcome: str = "ok", **detail: Any) -> None:
    """Append one entry now, as the CLI (scalars only in ``detail``; sanitised like every entry)."""
    from skyfleet.state.audit import AuditRepository

    await AuditRepository(store.engine).record(action, actor=CLI_ACTOR, tenant_id=tenant_id, target=target,
                                               outcome=outcome, **detail)


def audited(action: str, fn: Callable[[Store], Awaitable[T]],
            what: Callable[[T], dict[str, Any]]) -> Callable[[Store], Awaitable[T]]:
    """``fn`` followed by its audit entry: ``what(result)`` gives ``tenant_id``, ``target`` and detail.

    For ``run_with_store``: ``run_with_store(settings, audited("tenant.create", create, lambda t: ...))``.
    The entry is written after the change committed; if it cannot be written the command fails.
    """

    async def go(store: Store) -> T:
        result = await fn(store)
        await record(store, action, **what(result))
        return result

    return go


@app.command("verify")
def verify(
    anchor: Annotated[str | None, typer.Option(
        "--anchor", help="SEQ:HASH from an earlier `skyfleet audit head`: also prove that entry is unchanged "
        "and still there.")] = None,
    config: ConfigOption = None,
) -> None:
    """Walk the whole chain. Prints OK with the entry count and head, or names the first bad seq (exit 1)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from skyfleet.audit.chain import Anchor, ChainVerifier
    from skyfleet.state.audit import AuditRepository

    expected: Anchor | None = None
    if anchor is not None:
        try:
            expected = Anchor.parse(anchor)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--anchor") from None

    async def go(store: Store) -> ChainVerifier:
        repo = AuditRepository(store.engine)
        head = await repo.head()
        console = Console(stderr=True)
        total = head.seq if head else 0
        with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True,
                      disable=total < _PROGRESS_FROM or not console.is_terminal) as bar:
            task = bar.add_task("verify", total=total)
            return await repo.verify(expected, on_page=lambda n: bar.advance(task, n))

    result = run_with_store(settings_or_exit(config), go)
    if result.problem is not None:
        p = result.problem
        typer.echo(f"audit log BROKEN at seq {p.seq} ({p.kind}): {p.message}. "
                   f"{result.count} entries before it verified.", err=True)
        raise typer.Exit(1)
    if result.count == 0:
        typer.echo("audit log OK: empty")
        return
    anchored = f"; matches anchor {expected.seq}" if expected else ""
    typer.echo(f"audit log OK: {result.count} entries, head {result.last_seq}:{result.last_hash}{anchored}")


@app.command("head")
def head(config: ConfigOption = None) -> None:
    """Print the newest entry as SEQ:HASH: store it outside the database to anchor the chain."""
    from skyfleet.state.audit import AuditRepository

    async def go(store: Store) -> Anchor | None:
        return await AuditRepository(store.engine).head()

    found = run_with_store(settings_or_exit(config), go)
    if found is None:
        typer.echo("skyfleet: the audit log is empty", err=True)
        raise typer.Exit(1)
    typer.echo(str(found))


@app.command("list")
def list_(
    tenant: Annotated[str | None, typer.Option(
        "--tenant", "-t", help="Only this tenant's entries (by name).")] = None,
    action: Annotated[str | None, typer.Option(
        "--action", "-a", help="An action (key.revoke), or a prefix: key.*")] = None,
    since: Annotated[str | None, typer.Option(
        help="ISO 8601 time (UTC if no zone), or an age: 30m, 12h, 7d.")] = None,
    before: Annotated[int | None, typer.Option(help="Only entries before this seq (the next page).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many entries.")] = 50,
    json: Annotated[bool, typer.Option("--json", help="Print JSON (entries, newest first).")] = False,
    config: ConfigOption = None,
) -> None:
    """List entries, newest first."""
    from skyfleet.state.audit import AuditQuery, AuditRepository, parse_since

    try:
        since_at = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None

    async def go(store: Store) -> tuple[list[Any], bool, dict[str, str]]:
        repo = AuditRepository(store.engine)
        tenant_ids = await repo.tenant_ids(tenant) if tenant is not None else None
        if tenant_ids == ():
            from skyfleet.errors import NotFoundError

            raise NotFoundError(f"tenant '{tenant[:100] if tenant else ''}' not found")
        query: AuditQuery = AuditQuery(tenant_ids=tenant_ids, action=action, since=since_at,
                                       before_seq=before, limit=limit)
        entries, more = await repo.list(query)
        names = await repo.tenant_names([e.tenant_id for e in entries if getattr(e, "tenant_id", None)])
        return entries, more, names

    entries, more, names = run_with_store(settings_or_exit(config), go)
    _print(entries, more, names, json)


def _print(entries: list[Any], more: bool, names: dict[str, str], as_json: bool) -> None:
    import orjson
    from rich.console import Console
    from rich.table import Table

    from skyfleet.audit.chain import SealedEntry

    if as_json:
        echo_json([{**e.json(), "tenant": names.get(e.tenant_id or "")} if isinstance(e, SealedEntry)
                   else {"seq": e.seq, "unreadable": e.why} for e in entries])
        return
    table = Table("seq", "at (UTC)", "action", "outcome", "actor", "tenant", "target", "detail")
    for e in entries:
        if not isinstance(e, SealedEntry):
            table.add_row(str(e.seq), "", "(unreadable)", "", "", "", "", e.why)
            continue
        tenant = names.get(e.tenant_id or "", e.tenant_id or "")
        table.add_row(str(e.seq), e.at.strftime("%Y-%m-%d %H:%M:%S"), e.action, e.outcome, e.actor or "",
                      tenant, e.target or "", orjson.dumps(dict(e.detail)).decode() if e.detail else "")
    Console().print(table)
    if more and entries:
        typer.echo(f"(more: --before {entries[-1].seq})", err=True)
