"""skyfleet budgets create|list|update|delete: spending caps per tenant or API key (cost/budgets.py).

Amounts are dollars ("12.50"). Changes apply to each running gateway within
``budgets.cache_ttl_s`` (limit changes at once with the database backend). Every change is
recorded in the audit log as the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from skyfleet.cli.audit import audited
from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

if TYPE_CHECKING:
    from skyfleet.config import Settings
    from skyfleet.cost.budget_gate import BudgetStatus
    from skyfleet.cost.budgets import BudgetDef
    from skyfleet.state.repositories import Store

app = typer.Typer(help="Budgets: soft (alert) and hard (429) spending limits per tenant or API key.",
                  no_args_is_help=True)

PeriodOption = Annotated[str, typer.Option(help="daily | monthly (UTC calendar windows) | total (never resets).")]
SoftOption = Annotated[str | None, typer.Option("--soft", help="Soft limit in dollars: alert once per period.")]
HardOption = Annotated[str | None, typer.Option("--hard", help="Hard limit in dollars: refuse requests past it.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _usd(value: str | None, flag: str) -> int | None:
    from skyfleet.cost.budgets import parse_usd

    if value is None:
        return None
    try:
        return parse_usd(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} {exc}", param_hint=flag) from None


async def _statuses(settings: Settings, store: Store, budgets: list[BudgetDef]) -> list[tuple[BudgetStatus, str]]:
    from skyfleet.cost.budget_gate import BudgetGate, open_backend
    from skyfleet.cost.budget_store_sql import BudgetRepository
    from skyfleet.cost.budgets import BudgetUnavailableError
    from skyfleet.errors import ServiceUnavailableError

    repo = BudgetRepository(store.engine)
    gate = BudgetGate(definitions=repo, backend=open_backend(settings, store.engine), pricing=None,
                      settings=settings.budgets)
    try:
        status = await gate.status(budgets)
    except BudgetUnavailableError:
        raise ServiceUnavailableError("the budget counters are unreachable") from None
    finally:
        await gate.close()
    names = await repo.names([b.tenant_id for b in budgets])
    return [(status[b.id], names.get(b.tenant_id, b.tenant_id)) for b in budgets]


def _show(rows: list[tuple[BudgetStatus, str]], json: bool) -> None:
    from skyfleet.api.admin.budget_schema import budget_json
    from skyfleet.cost.budgets import format_usd

    if json:
        echo_json([budget_json(s, name) for s, name in rows])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "tenant", "key", "period", "soft $", "hard $", "spent $", "reserved $", "resets")
    for s, name in rows:
        b = s.budget
        table.add_row(b.id, name, b.key_id or "(tenant)", b.period,
                      format_usd(b.soft_limit_usd_micros) if b.soft_limit_usd_micros is not None else "-",
                      format_usd(b.hard_limit_usd_micros) if b.hard_limit_usd_micros is not None else "-",
                      format_usd(s.state.spent), format_usd(s.state.reserved),
                      s.period_end.isoformat(timespec="seconds") if s.period_end else "never")
    Console().print(table)


def _audit_detail(b: BudgetDef) -> dict[str, Any]:
    return {"tenant_id": b.tenant_id, "target": b.id, "key_id": b.key_id, "period": b.period,
            "soft_limit_usd_micros": b.soft_limit_usd_micros, "hard_limit_usd_micros": b.hard_limit_usd_micros}


@app.command("create")
def create(
    tenant: Annotated[str | None, typer.Option(help="Tenant name (a tenant budget).")] = None,
    key: Annotated[str | None, typer.Option("--key", help="API key id (a key budget).")] = None,
    period: PeriodOption = "monthly",
    soft: SoftOption = None,
    hard: HardOption = None,
    json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Create a budget for a tenant (--tenant) or an API key (--key)."""
    from skyfleet.cost.budgets import PERIODS

    if period not in PERIODS:
        raise typer.BadParameter(f"unknown period {period!r}; use one of: {', '.join(PERIODS)}", param_hint="--period")
    if (tenant is None) == (key is None):
        raise typer.BadParameter("give exactly one of --tenant and --key")
    soft_m, hard_m = _usd(soft, "--soft"), _usd(hard, "--hard")
    settings = settings_or_exit(config)

    async def go(store: Store) -> list[tuple[BudgetStatus, str]]:
        from skyfleet.cost.budget_store_sql import BudgetRepository
        from skyfleet.errors import NotFoundError

        repo = BudgetRepository(store.engine)
        if key is not None:
            owner = await repo.key_owner(key)
            if owner is None:
                raise NotFoundError(f"API key '{key[:32]}' not found")
            tenant_id = owner[0]
        else:
            assert tenant is not None
            named = await repo.tenant_by_name(tenant)
            if named is None:
                raise NotFoundError(f"tenant '{tenant[:63]}' not found")
            tenant_id = named[0]
        made = await audited("budget.create", lambda s: repo.create(
            tenant_id=tenant_id, key_id=key, period=period, soft_limit_usd_micros=soft_m,
            hard_limit_usd_micros=hard_m), _audit_detail)(store)
        return await _statuses(settings, store, [made])

    rows = run_with_store(settings, go)
    if json:
        _show(rows, True)
    else:
        typer.echo(f"created budget {rows[0][0].budget.id}")


@app.command("list")
def list_(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's budgets.")] = None,
    json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List budgets with the current period's spend and reservations."""
    settings = settings_or_exit(config)

    async def go(store: Store) -> list[tuple[BudgetStatus, str]]:
        from skyfleet.cost.budget_store_sql import BudgetRepository
        from skyfleet.errors import NotFoundError

        repo = BudgetRepository(store.engine)
        tenant_id = None
        if tenant is not None:
            named = await repo.tenant_by_name(tenant)
            if named is None:
                raise NotFoundError(f"tenant '{tenant[:63]}' not found")
            tenant_id = named[0]
        return await _statuses(settings, store, await repo.list(tenant_id=tenant_id))

    _show(run_with_store(settings, go), json)


@app.command("update")
def update(
    budget_id: Annotated[str, typer.Argument(help="The budget's id (bud_...).")],
    soft: SoftOption = None,
    hard: HardOption = None,
    no_soft: Annotated[bool, typer.Option("--no-soft", help="Remove the soft limit.")] = False,
    no_hard: Annotated[bool, typer.Option("--no-hard", help="Remove the hard limit.")] = False,
    json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Change a budget's limits (only what is given); a limit below the spend applies to the next request."""
    changes: dict[str, int | None] = {}
    for name, value, clear, flag in (("soft_limit_usd_micros", soft, no_soft, "--soft"),
                                     ("hard_limit_usd_micros", hard, no_hard, "--hard")):
        if value is not None and clear:
            raise typer.BadParameter(f"give one of {flag} and --no-{flag[2:]}")
        if value is not None or clear:
            changes[name] = _usd(value, flag)
    if not changes:
        raise typer.BadParameter("nothing to change: give --soft, --hard, --no-soft or --no-hard")
    settings = settings_or_exit(config)

    async def go(store: Store) -> list[tuple[BudgetStatus, str]]:
        from skyfleet.cost.budget_store_sql import BudgetRepository

        repo = BudgetRepository(store.engine)
        changed = await audited("budget.update", lambda s: repo.update(budget_id, changes),
                                lambda b: {**_audit_detail(b), "fields": ",".join(sorted(changes))})(store)
        return await _statuses(settings, store, [changed])

    rows = run_with_store(settings, go)
    if json:
        _show(rows, True)
    else:
        typer.echo(f"updated {budget_id} ({', '.join(sorted(changes))})")


@app.command("delete")
def delete(budget_id: Annotated[str, typer.Argument(help="The budget's id (bud_...).")],
           config: ConfigOption = None) -> None:
    """Delete a budget (its counters go with it)."""
    settings = settings_or_exit(config)

    async def go(store: Store) -> None:
        from skyfleet.cost.budget_gate import open_backend
        from skyfleet.cost.budget_store_sql import BudgetRepository
        from skyfleet.cost.budgets import BudgetUnavailableError

        repo = BudgetRepository(store.engine)
        gone = await audited("budget.delete", lambda s: repo.delete(budget_id),
                             lambda b: {"tenant_id": b.tenant_id, "target": b.id})(store)
        backend = open_backend(settings, store.engine)
        try:
            await backend.forget(gone)
        except BudgetUnavailableError:
            typer.echo("skyfleet: warning: the budget's Redis counters were not dropped (they expire)", err=True)
        finally:
            await backend.close()

    run_with_store(settings, go)
    typer.echo(f"deleted budget {budget_id}")
