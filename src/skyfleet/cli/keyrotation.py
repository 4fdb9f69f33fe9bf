"""skyfleet keys rotate-kek | rotate-dek: key rotation with no downtime (registered on the `keys` group).

``rotate-kek``: a new key-encryption key version at the key provider, every tenant's wrapped data
keys rewrapped under it; ``--retire-old`` then retires the old KEK versions.
``rotate-dek --tenant T``: a new data key version for T (new records use it at once), T's records
re-encrypted under it in batches; ``--retire-old`` then destroys the old data key versions.
Both run beside live gateways (no request fails), may be interrupted and run again.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer

from skyfleet.cli.common import ConfigOption, echo_json, run_with_store, settings_or_exit

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from skyfleet.crypto.rotation import KekProgress, KekRotationReport
    from skyfleet.state.reencrypt import ReencryptProgress, ReencryptReport
    from skyfleet.state.repositories import Store

RetireOption = Annotated[bool, typer.Option("--retire-old", help="Afterwards, make the old versions unusable.")]
SettleOption = Annotated[
    float,
    typer.Option("--settle-s", min=0.0, help="With --retire-old: seconds to let other gateways pick up the new "
                 "version first (longer than their 5 s key refresh)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]


def _progress() -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


class _Bar:
    """One progress task per pass."""

    def __init__(self, progress: Progress, what: str) -> None:
        self.progress, self.what = progress, what
        self.tasks: dict[int, TaskID] = {}

    def update(self, pass_no: int, total: int, done: int) -> None:
        task = self.tasks.get(pass_no)
        if task is None:
            label = self.what if pass_no == 1 else f"{self.what} (pass {pass_no})"
            task = self.tasks[pass_no] = self.progress.add_task(label, total=total)
        self.progress.update(task, completed=done, total=total)


def rotate_kek(retire_old: RetireOption = False, settle_s: SettleOption = 15.0, json: JsonOption = False,
               config: ConfigOption = None) -> None:
    """Rotate the key-encryption keys and rewrap every tenant's data keys under them."""
    from skyfleet.crypto.rotation import rotate_kek as run

    settings = settings_or_exit(config)

    async def go(store: Store) -> KekRotationReport:
        with _progress() as progress:
            bar = _Bar(progress, "rewrapping data keys")

            def step(p: KekProgress) -> None:
                bar.update(p.pass_no, p.total, p.done)

            return await run(store.engine, store.keyring.provider, retire_old=retire_old,  # type: ignore[arg-type]
                             settle_s=settle_s, progress=step)

    report = run_with_store(settings, go, with_keys=True)
    if json:
        echo_json(asdict(report))
        return
    typer.echo(
        f"{report.provider}: {report.rewrapped} data keys of {report.tenants} tenants rewrapped "
        f"({report.rotated} KEKs got new key material)"
        + (f"; {report.failed} could not be unwrapped" if report.failed else "")
        + ("; old KEK versions retired" if report.retired else "")
    )
    if report.stale:
        typer.echo(f"skyfleet: {report.stale} data keys are still under an old KEK: run it again", err=True)
        raise typer.Exit(1)


def rotate_dek(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant's name.")],
    retire_old: RetireOption = False,
    resume: Annotated[bool, typer.Option("--resume", help="Do not start a new version: finish re-encrypting "
                                                          "under the current one (after an interruption).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=10_000, help="Records per transaction.")] = 200,
    pause_ms: Annotated[int, typer.Option("--pause-ms", min=0, help="Pause between batches (eases the load).")] = 0,
    settle_s: SettleOption = 15.0,
    json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Start a new data key version for a tenant and re-encrypt its records under it."""
    from skyfleet.state.reencrypt import rotate_dek as run

    settings = settings_or_exit(config)

    async def go(store: Store) -> ReencryptReport:
        record = await store.tenants.get(tenant)
        with _progress() as progress:
            bar = _Bar(progress, f"re-encrypting {record.name}")

            def step(p: ReencryptProgress) -> None:
                bar.update(p.pass_no, p.total, p.done)

            return await run(store.engine, store.keyring, record.id, new_version=not resume, retire_old=retire_old,
                             settle_s=settle_s, batch_size=batch_size, pause_s=pause_ms / 1000, progress=step)

    report = run_with_store(settings, go, with_keys=True)
    if json:
        data: dict[str, Any] = asdict(report)
        data["retired"] = list(report.retired)
        echo_json(data)
    else:
        typer.echo(
            f"tenant {tenant}: data key version {report.target_version}; {report.reencrypted} records re-encrypted"
            + (f", {report.failed} could not be decrypted" if report.failed else "")
            + (f"; versions {', '.join(map(str, report.retired))} destroyed" if report.retired else "")
        )
    if report.remaining:
        typer.echo(f"skyfleet: {report.remaining} records are still under an older data key: "
                   "run it again with --resume", err=True)
        raise typer.Exit(1)


def register(group: typer.Typer) -> None:
    """Add the rotation commands to the `keys` group."""
    group.command("rotate-kek")(rotate_kek)
    group.command("rotate-dek")(rotate_dek)
