"""The audit log on real SQLite and PostgreSQL: appending (also from racing writers and processes),
the background writer, `skyfleet audit verify` against tampering, the admin route, and no secrets."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from skyfleet.audit.chain import GENESIS, Anchor, SealedEntry, draft, seal, verify
from skyfleet.audit.log import AuditLog
from skyfleet.clock import ManualClock
from skyfleet.errors import ServiceUnavailableError
from skyfleet.iam.principal import Principal
from skyfleet.state import Store, make_engine
from skyfleet.state.audit import APPEND_ATTEMPTS, AuditQuery, AuditRepository, _row, parse_since
from skyfleet.state.models import AuditEntry

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _draft(i: int, **kw: Any) -> Any:
    return draft(T0 + timedelta(seconds=i, microseconds=i), kw.pop("action", "test.event"), **kw)


async def _all(repo: AuditRepository) -> list[SealedEntry]:
    out: list[SealedEntry] = []
    async for page in repo.pages(page_size=7):
        for e in page:
            assert isinstance(e, SealedEntry), e
            out.append(e)
    return out


async def _wait_for(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the repository -------------------------------------------------------------------------------


async def test_append_roundtrips_exactly_and_verifies(store: Store) -> None:
    repo = AuditRepository(store.engine)
    assert await repo.head() is None
    assert (await repo.verify()).problem is None and (await repo.verify()).count == 0
    first = await repo.append([_draft(0, actor="key_a", tenant_id="ten_a", target="conv_1",
                                      detail={"n": 1, "ok": True, "x": 0.25, "s": "é✓"})])
    assert (first[0].seq, first[0].prev_hash) == (1, GENESIS)
    more = await repo.append([_draft(i, tenant_id="ten_b" if i % 2 else "ten_a") for i in range(1, 20)])
    assert [e.seq for e in more] == list(range(2, 21)) and more[0].prev_hash == first[0].hash
    stored = await _all(repo)
    # What is read back is what was hashed, to the microsecond.
    assert stored == first + more
    assert verify(stored) is None
    assert await repo.head() == Anchor(20, more[-1].hash) and await repo.count() == 20
    result = await repo.verify(Anchor(20, more[-1].hash))
    assert (result.problem, result.count, result.last_hash) == (None, 20, more[-1].hash)
    one = await repo.record("key.revoke", actor="cli", tenant_id="ten_a", target="key_x", role="member",
                            note="sk-sf-" + "Q" * 43)
    assert one.seq == 21 and one.detail == {"role": "member", "note": "[redacted]"}


async def test_list_filters(store: Store) -> None:
    repo = AuditRepository(store.engine)
    acme = await store.tenants.create("acme")
    globex = await store.tenants.create("globex")
    await repo.append([_draft(0, action="key.create", tenant_id=acme.id),
                       _draft(1, action="key.revoke", tenant_id=acme.id),
                       _draft(2, action="tenant.create", tenant_id=globex.id),
                       _draft(3, action="keyring.x", tenant_id=acme.id),
                       _draft(4, action="auth.failure")])
    page, more = await repo.list(AuditQuery(limit=2))
    assert [e.seq for e in page] == [5, 4] and more
    page, more = await repo.list(AuditQuery(limit=2, before_seq=page[-1].seq))
    assert [e.seq for e in page] == [3, 2] and more
    ids = await repo.tenant_ids("acme")
    assert [e.seq for e in (await repo.list(AuditQuery(tenant_ids=ids)))[0]] == [4, 2, 1]
    assert [e.seq for e in (await repo.list(AuditQuery(action="key.*")))[0]] == [2, 1]  # not keyring.x
    assert [e.seq for e in (await repo.list(AuditQuery(action="key.revoke")))[0]] == [2]
    assert [e.seq for e in (await repo.list(AuditQuery(action="%")))[0]] == []
    assert [e.seq for e in (await repo.list(AuditQuery(since=T0 + timedelta(seconds=3))))[0]] == [5, 4]
    assert await repo.tenant_names([acme.id, globex.id, "ten_gone"]) == {acme.id: "acme", globex.id: "globex"}
    # A deleted tenant's entries stay listable by its name.
    await store.tenants.delete("globex")
    assert await repo.tenant_ids("globex") == (globex.id,)


def test_parse_since() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2025-03-01T10:00:00Z") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_since("2025-03-01T10:00:00") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_since("2025-03-01T12:00:00+02:00") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    for bad in ("", "yesterday", "5w", "999999d", "2025-13-01"):
        with pytest.raises(ValueError):
            parse_since(bad, now)


async def _race(engines: list[AsyncEngine], writers: int, batches: int, tag: str) -> list[tuple[str, int]]:
    """``writers`` tasks per engine, each appending ``batches`` batches of 1-3 entries at once."""
    start = asyncio.Event()
    written: list[tuple[str, int]] = []

    async def writer(repo: AuditRepository, name: str) -> None:
        await start.wait()
        for b in range(batches):
            size = 1 + (b % 3)
            await repo.append([_draft(b, action="race.append", detail={"writer": name, "n": b * 10 + k})
                               for k in range(size)])
            written.extend((name, b * 10 + k) for k in range(size))

    tasks = [asyncio.create_task(writer(AuditRepository(engine), f"{tag}{e}-{w}"))
             for e, engine in enumerate(engines) for w in range(writers)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.gather(*tasks)
    return written


async def _chain_holds(engine: AsyncEngine, expected: list[tuple[str, int]]) -> None:
    repo = AuditRepository(engine)
    result = await repo.verify()
    assert result.problem is None, result.problem
    entries = await _all(repo)
    got = sorted((str(e.detail["writer"]), int(e.detail["n"])) for e in entries if e.action == "race.append")
    assert got == sorted(expected)  # nothing lost, nothing written twice
    assert result.count == len(entries) == entries[-1].seq


async def test_racing_writers_on_two_engines_make_one_chain(db_url: str) -> None:
    a, b = await Store.open(db_url), await Store.open(db_url)
    try:
        written = await _race([a.engine, b.engine], writers=4, batches=8, tag="t")
        await _chain_holds(a.engine, written)
    finally:
        await a.close()
        await b.close()


_WRITER_SCRIPT = """
import asyncio, sys
from datetime import UTC, datetime
from skyfleet.audit.chain import draft
from skyfleet.state import make_engine
from skyfleet.state.audit import AuditRepository

async def main(url, name, count):
    engine = make_engine(url)
    repo = AuditRepository(engine)
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(count):
        await repo.append([draft(datetime.now(UTC), "race.append", detail={"writer": name, "n": n})])
    await engine.dispose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_racing_processes_on_postgres_make_one_chain(pg_url: str) -> None:
    store = await Store.open(pg_url)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, pg_url, f"p{i}", "40"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for p in procs:  # both processes connected and waiting: then all writers start together
            assert p.stdout is not None and await asyncio.to_thread(p.stdout.readline) == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        written = await _race([store.engine], writers=3, batches=12, tag="t")
        for p in procs:
            assert await asyncio.to_thread(p.wait, 60) == 0
        written += [(f"p{i}", n) for i in range(2) for n in range(40)]
        await _chain_holds(store.engine, written)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await store.close()


async def _lock_waiters(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ))).scalar_one())


@pytest.mark.parametrize("attempts", [APPEND_ATTEMPTS, 1])
async def test_a_lost_race_is_retried_after_the_fresh_head(pg_url: str, attempts: int) -> None:
    """An append that read the same head as another writer collides on the primary key; it goes again
    after the fresh head (and with no attempts left, it fails rather than fork the chain)."""
    store = await Store.open(pg_url)
    try:
        first = (await AuditRepository(store.engine).append([_draft(0)]))[0]
        held = seal(first.seq, first.hash, [_draft(1, action="other.writer")])[0]
        async with store.engine.connect() as conn:
            tx = await conn.begin()
            await conn.execute(insert(AuditEntry).values(**_row(held)))  # seq 2, not yet committed
            racer = AuditRepository(store.engine, attempts=attempts)
            pending = asyncio.create_task(racer.append([_draft(2)]))
            # The append read seq 1 as the head and now waits on seq 2's uncommitted row.
            await _wait_for(lambda: _positive(_lock_waiters(store.engine)),
                            what="the append to block on seq 2")
            await tx.commit()
        if attempts == 1:
            with pytest.raises(ServiceUnavailableError):
                await asyncio.wait_for(pending, 10)
            assert await AuditRepository(store.engine).count() == 2
        else:
            sealed = (await asyncio.wait_for(pending, 10))[0]
            assert (sealed.seq, sealed.prev_hash) == (3, held.hash)
        assert (await AuditRepository(store.engine).verify()).problem is None
    finally:
        await store.close()


async def _positive(value: Any) -> bool:
    return bool(await value)


# -- AuditLog: the queue and its writer -----------------------------------------------------------


def _principal(role: str = "member", key_id: str = "key_member", tenant_id: str = "ten_acme") -> Principal:
    return Principal(tenant_id=tenant_id, tenant_name="acme", role=role, key_id=key_id)


async def test_audit_log_writes_in_the_background_and_aggregates_key_use(store: Store) -> None:
    clock = ManualClock()
    registry = CollectorRegistry()
    repo = AuditRepository(store.engine)
    log = AuditLog(repo, clock, flush_interval_s=0.02, key_use_window_s=60, registry=registry)
    log.start()
    try:
        member, admin = _principal(), _principal("platform-admin", "key_admin")
        for _ in range(5):
            log.key_used(member)
        log.key_used(admin)
        log.record("conversation.delete", actor=member, target="conv_1")
        log.record("tenant.create", actor=admin, tenant_id="ten_new", target="ten_new")
        log.record("tenant.update", actor=admin, target="ten_x", fields="rpm_limit")
        await _wait_for(lambda: _count(repo, 3), what="three entries written")
        clock.advance(59)
        log.key_used(member)
        clock.advance(2)  # the window closes: one key.use entry per key, with its count
        await _wait_for(lambda: _count(repo, 5), what="key.use entries")
        log.key_used(member)  # the next window: written by close()
    finally:
        await log.close()
    entries = await _all(repo)
    assert [e.action for e in entries[:3]] == ["conversation.delete", "tenant.create", "tenant.update"]
    # The actor's tenant by default; a platform admin's action belongs to no tenant unless one is named.
    assert [(e.actor, e.tenant_id) for e in entries[:3]] == [
        ("key_member", "ten_acme"), ("key_admin", "ten_new"), ("key_admin", None)]
    uses = {e.actor: e for e in entries[3:5]}
    assert uses["key_member"].detail["count"] == 6 and uses["key_member"].tenant_id == "ten_acme"
    assert uses["key_admin"].detail["count"] == 1 and uses["key_admin"].tenant_id is None
    assert all(e.action == "key.use" for e in entries[3:])
    assert [(e.actor, e.detail["count"]) for e in entries[5:]] == [("key_member", 1)]
    assert (await repo.verify()).problem is None
    assert registry.get_sample_value("skyfleet_audit_written_total") == 6
    assert registry.get_sample_value("skyfleet_audit_pending") == 0


async def _count(repo: AuditRepository, n: int) -> bool:
    return await repo.count() >= n


async def test_full_queue_drops_and_counts_never_blocks(store: Store,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    log = AuditLog(AuditRepository(store.engine), ManualClock(), max_pending=3, max_keys_per_window=1,
                   registry=registry)
    with caplog.at_level(logging.WARNING, logger="skyfleet.audit"):
        for i in range(5):
            log.record("x.y", actor=None, n=i)
        log.key_used(_principal(key_id="key_1"))
        log.key_used(_principal(key_id="key_2"))  # a second key in the window: over max_keys_per_window
    assert (log.pending, log.dropped) == (3, 3)
    assert registry.get_sample_value("skyfleet_audit_dropped_total") == 3
    assert [r.message for r in caplog.records] == ["audit queue full: entries dropped"]  # once, not per drop
    assert await log.flush() == 3
    log.roll_key_uses()
    assert await log.flush() == 1
    entries = await _all(AuditRepository(store.engine))
    assert [e.detail.get("n", e.actor) for e in entries] == [0, 1, 2, "key_1"]


async def test_record_never_raises_on_bad_input(store: Store) -> None:
    log = AuditLog(AuditRepository(store.engine), ManualClock())
    log.record(None, actor=None)  # type: ignore[arg-type]
    log.record("x.y", actor="not a principal", tenant_id=123,  # type: ignore[arg-type]
               target=object(), outcome=None,  # type: ignore[arg-type]
               blob=b"bytes", obj=object(), big=10**30, **{"bad name": 1})  # type: ignore[arg-type]
    log.key_used(None)  # type: ignore[arg-type]
    await log.flush()
    entries = await _all(AuditRepository(store.engine))
    assert entries[0].action == "invalid"
    assert entries[1].actor == "not a principal" and entries[1].tenant_id == "123"
    assert entries[1].detail == {"blob": None, "obj": None, "big": str(10**30)}
    assert log.dropped == 1  # the key_used(None)


async def test_store_down_keeps_entries_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nothing")  # nothing listens there
    log = AuditLog(AuditRepository(engine, attempts=1), ManualClock(), flush_interval_s=0.01)
    try:
        log.start()
        log.record("x.y", actor=None)
        with pytest.raises(ServiceUnavailableError):
            await log.flush()
        assert log.pending == 1
        with caplog.at_level(logging.WARNING, logger="skyfleet.audit"):
            await _wait_for(lambda: _logged(caplog, "audit log write failed; retrying"), what="a retry")
            log.record("x.z", actor=None)  # still accepted while the store is down
            await log.close(timeout_s=5)
        assert any(r.message == "audit log: final write failed; entries lost" for r in caplog.records)
    finally:
        await engine.dispose()


async def _logged(caplog: pytest.LogCaptureFixture, message: str) -> bool:
    return any(r.message == message for r in caplog.records)


# -- skyfleet audit verify | head | list, against tampering done with SQL --------------------------


def _cli(db_url: str, data_dir: Path, *args: str) -> Any:
    from skyfleet.cli.app import app

    env = {"SKYFLEET_DATABASE_URL": db_url, "SKYFLEET_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


async def _cli_async(db_url: str, data_dir: Path, *args: str) -> Any:
    return await asyncio.to_thread(_cli, db_url, data_dir, *args)


async def _seed(store: Store, n: int = 6) -> list[SealedEntry]:
    return await AuditRepository(store.engine).append([_draft(i, target=f"t{i}") for i in range(n)])


async def _sql(store: Store, *statements: str) -> None:
    async with store.engine.begin() as conn:
        for stmt in statements:
            await conn.execute(text(stmt))


async def test_verify_ok_head_and_anchor(store: Store, db_url: str, tmp_path: Path) -> None:
    assert (await _cli_async(db_url, tmp_path, "audit", "verify")).stdout.strip() == "audit log OK: empty"
    assert (await _cli_async(db_url, tmp_path, "audit", "head")).exit_code == 1
    sealed = await _seed(store)
    ok = await _cli_async(db_url, tmp_path, "audit", "verify")
    assert ok.exit_code == 0 and ok.stdout.strip() == f"audit log OK: 6 entries, head 6:{sealed[-1].hash}"
    head = (await _cli_async(db_url, tmp_path, "audit", "head")).stdout.strip()
    assert head == f"6:{sealed[-1].hash}"
    anchored = await _cli_async(db_url, tmp_path, "audit", "verify", "--anchor", head)
    assert anchored.exit_code == 0 and "matches anchor 6" in anchored.stdout
    # Dropping the newest entry leaves a chain that verifies on its own: only the anchor catches it.
    await _sql(store, "DELETE FROM audit_log WHERE seq = 6")
    assert (await _cli_async(db_url, tmp_path, "audit", "verify")).exit_code == 0
    cut = await _cli_async(db_url, tmp_path, "audit", "verify", "--anchor", head)
    assert cut.exit_code == 1 and "BROKEN at seq 6 (anchor)" in cut.stderr
    bad = await _cli_async(db_url, tmp_path, "audit", "verify", "--anchor", "6:nothex")
    assert bad.exit_code == 2


@pytest.mark.parametrize(("tamper", "seq", "kind"), [
    (["UPDATE audit_log SET target = 'forged' WHERE seq = 3"], 3, "modified"),
    (["UPDATE audit_log SET outcome = 'error' WHERE seq = 1"], 1, "modified"),
    (["UPDATE audit_log SET detail = 'not json' WHERE seq = 2"], 2, "modified"),
    (["DELETE FROM audit_log WHERE seq = 4"], 4, "missing"),
    (["DELETE FROM audit_log WHERE seq = 1"], 1, "missing"),
    # Swap two rows (seq 3 <-> 4), in three steps so the primary key holds throughout.
    (["UPDATE audit_log SET seq = -3 WHERE seq = 3", "UPDATE audit_log SET seq = 3 WHERE seq = 4",
      "UPDATE audit_log SET seq = 4 WHERE seq = -3"], 3, "modified"),
])
async def test_verify_names_the_first_bad_seq(store: Store, db_url: str, tmp_path: Path, tamper: list[str],
                                              seq: int, kind: str) -> None:
    await _seed(store)
    await _sql(store, *tamper)
    result = await _cli_async(db_url, tmp_path, "audit", "verify")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"audit log BROKEN at seq {seq} ({kind}):"), result.stderr


async def test_verify_catches_a_rehashed_row_by_its_successor(store: Store, db_url: str,
                                                              tmp_path: Path) -> None:
    """A forger who also recomputes the changed row's own hash breaks the next row's link instead."""
    sealed = await _seed(store)
    import dataclasses

    from skyfleet.audit.chain import entry_hash

    forged = dataclasses.replace(sealed[2], target="forged")
    forged = dataclasses.replace(forged, hash=entry_hash(forged.prev_hash, forged.seq, forged))
    await _sql(store, f"UPDATE audit_log SET target = 'forged', hash = '{forged.hash}' WHERE seq = 3")
    result = await _cli_async(db_url, tmp_path, "audit", "verify")
    assert result.exit_code == 1 and "BROKEN at seq 4 (broken-link)" in result.stderr


async def test_cli_list(store: Store, db_url: str, tmp_path: Path) -> None:
    import orjson

    acme = await store.tenants.create("acme")
    repo = AuditRepository(store.engine)
    await repo.append([_draft(0, action="key.create", tenant_id=acme.id, target="key_1",
                              detail={"role": "member"}),
                       _draft(1, action="auth.failure", outcome="denied")])
    listed = orjson.loads((await _cli_async(db_url, tmp_path, "audit", "list", "--json")).stdout)
    assert [e["seq"] for e in listed] == [2, 1]
    assert listed[1] | {"hash": None, "prev_hash": None} == {
        "seq": 1, "at": "2025-03-01T12:00:00.123456Z", "action": "key.create", "outcome": "ok", "actor": None,
        "tenant_id": acme.id, "tenant": "acme", "target": "key_1", "detail": {"role": "member"},
        "hash": None, "prev_hash": None}
    only = orjson.loads((await _cli_async(db_url, tmp_path, "audit", "list", "--tenant", "acme",
                                          "--json")).stdout)
    assert [e["seq"] for e in only] == [1]
    assert orjson.loads((await _cli_async(db_url, tmp_path, "audit", "list", "--action", "auth.*", "--json",
                                          "--since", "2025-03-01T12:00:00.5Z")).stdout)[0]["seq"] == 2
    table = await _cli_async(db_url, tmp_path, "audit", "list", "--limit", "1")
    assert table.exit_code == 0 and "auth.failure" in table.stdout and "--before 2" in table.stderr
    assert (await _cli_async(db_url, tmp_path, "audit", "list", "--tenant", "nobody")).exit_code == 1
    assert (await _cli_async(db_url, tmp_path, "audit", "list", "--since", "soon")).exit_code == 2


async def test_cli_changes_are_audited(store: Store, db_url: str, tmp_path: Path) -> None:
    run = _cli_async
    assert (await run(db_url, tmp_path, "tenants", "create", "acme")).exit_code == 0
    assert (await run(db_url, tmp_path, "tenants", "retention", "acme", "--days", "30")).exit_code == 0
    created = await run(db_url, tmp_path, "keys", "create", "--tenant", "acme", "--json")
    import orjson

    key = orjson.loads(created.stdout)
    assert (await run(db_url, tmp_path, "keys", "revoke", key["id"])).exit_code == 0
    assert (await run(db_url, tmp_path, "tenants", "delete", "acme")).exit_code == 0
    entries = await _all(AuditRepository(store.engine))
    tenant_id = entries[0].tenant_id
    assert [(e.action, e.actor, e.tenant_id) for e in entries] == [
        ("tenant.create", "cli", tenant_id), ("tenant.retention", "cli", tenant_id),
        ("key.create", "cli", tenant_id), ("key.revoke", "cli", tenant_id),
        ("tenant.delete", "cli", tenant_id)]
    assert entries[1].detail == {"retention_days": 30}
    assert entries[2].target == entries[3].target == key["id"] and entries[2].detail == {"role": "member"}
    assert key["key"] not in repr(entries)
    # A command that fails changes nothing and records nothing.
    assert (await run(db_url, tmp_path, "keys", "revoke", "key_nothere")).exit_code == 1
    assert await AuditRepository(store.engine).count() == 5


# -- the gateway: wiring, the admin route, and no secret in any entry ------------------------------

ADMIN_KEY = "sk-sf-" + "B" * 43


async def test_gateway_records_deletions_and_key_use_without_secrets(db_url: str, tmp_path: Path) -> None:
    from skyfleet.api.app import build_app
    from skyfleet.config import Settings
    from skyfleet.runtime import Gateway

    gw = await Gateway.create(Settings(data_dir=tmp_path / "data", bootstrap=False,
                                       database_url=SecretStr(db_url), admin_key=SecretStr(ADMIN_KEY),
                                       local={"replicas": 0}))
    assert isinstance(gw.audit, AuditLog)
    await gw.start()
    canary_prompt = "CANARY-PROMPT-7f3a91"
    canary_meta = "CANARY-META-c0ffee"
    bad_key = "sk-sf-" + "C" * 43
    stopped = False
    try:
        await gw.store.tenants.create("acme")
        await gw.store.tenants.create("globex")
        member, member_rec = await gw.store.keys.create("acme", role="member")
        tadmin, _ = await gw.store.keys.create("acme", role="tenant-admin")
        other, _ = await gw.store.keys.create("globex", role="member")
        transport = httpx.ASGITransport(app=build_app(gw, manage_lifecycle=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as h:
            auth = {"Authorization": f"Bearer {member}"}
            conv = (await h.post("/v1/conversations", headers=auth, json={
                "items": [{"type": "message", "role": "user", "content": f"{canary_prompt} {member}"}],
                "metadata": {"note": canary_meta}})).json()
            assert (await h.delete(f"/v1/conversations/{conv['id']}", headers=auth)).status_code == 200
            assert (await h.delete("/v1/responses/resp_nothere", headers=auth)).status_code == 404
            for key, status in ((bad_key, 401), (canary_prompt, 401), (other, 200)):
                r = await h.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == status
            await gw.audit.flush()
            # The admin route: a tenant-admin sees its own tenant only; a member none; platform everything.
            mine = await h.get("/admin/v1/audit", headers={"Authorization": f"Bearer {tadmin}"})
            assert mine.status_code == 200, mine.text
            assert {e["action"] for e in mine.json()["data"]} == {"conversation.delete"}
            assert mine.json()["data"][0]["target"] == conv["id"]
            assert mine.json()["data"][0]["actor"] == member_rec.id
            assert (await h.get("/admin/v1/audit", params={"tenant": "globex"},
                                headers={"Authorization": f"Bearer {tadmin}"})).status_code == 403
            assert (await h.get("/admin/v1/audit", headers=auth)).status_code == 403
            pa = {"Authorization": f"Bearer {ADMIN_KEY}"}
            everything = (await h.get("/admin/v1/audit", headers=pa, params={"limit": "1000"})).json()
            assert everything["has_more"] is False and len(everything["data"]) >= 2
            # The two failed authentications were written as one entry with their count.
            [failures] = [e for e in everything["data"] if e["action"] == "auth.failure"]
            assert failures["detail"]["count"] == 2 and failures["target"] == "GET /v1/models"
            page = (await h.get("/admin/v1/audit", headers=pa,
                                params={"limit": "1", "action": "auth.*"})).json()
            assert [e["action"] for e in page["data"]] == ["auth.failure"] and page["has_more"] is False
            page = (await h.get("/admin/v1/audit", headers=pa, params={"limit": "1"})).json()
            assert len(page["data"]) == 1 and page["has_more"] is True
            for params in ({"limit": "0"}, {"since": "later"}, {"before": "x"}, {"action": "a\x00"},
                           {"x": "1"}):
                r = await h.get("/admin/v1/audit", headers=pa, params=params)
                assert r.status_code == 400, (params, r.text)
            r = await h.get("/admin/v1/audit", headers=pa, params={"tenant": "no\x00pe"})
            assert r.status_code == 404
        await gw.stop()  # the final flush writes the key-use window
        stopped = True
    finally:
        if not stopped:
            await gw.stop()
    store = await Store.open(db_url)
    try:
        async with store.engine.connect() as conn:
            result = await conn.execute(text("SELECT * FROM audit_log ORDER BY seq"))
            rows = [tuple(r) for r in result.all()]
        repo = AuditRepository(store.engine)
        assert (await repo.verify()).problem is None
        entries = await _all(repo)
    finally:
        await store.close()
    actions = [e.action for e in entries]
    assert actions.count("conversation.delete") == 1 and "response.delete" not in actions
    uses = {e.actor: e.detail["count"] for e in entries if e.action == "key.use"}
    assert uses[member_rec.id] == 4 and uses["bootstrap"] >= 3  # 3 requests + the refused audit read
    flat = repr(rows)
    for secret in (member, tadmin, other, bad_key, ADMIN_KEY, canary_prompt, canary_meta, "C" * 43, "B" * 43):
        assert secret not in flat


async def test_retention_sweep_is_recorded(db_url: str, tmp_path: Path) -> None:
    from skyfleet.config import Settings
    from skyfleet.runtime import Gateway

    # The gateway's clock is in 2023: what it stores now is long past a 1-day retention.
    settings = Settings(data_dir=tmp_path / "data", bootstrap=False, database_url=SecretStr(db_url),
                        local={"replicas": 0}, retention_sweep_interval_s=0.05)
    gw = await Gateway.create(settings, clock=ManualClock())
    assert isinstance(gw.audit, AuditLog)
    try:
        tenant = await gw.store.tenants.create("acme")
        for _ in range(2):
            await gw.store.conversations.create(tenant.id, metadata={}, items=[])
        await gw.store.tenants.set_retention("acme", 1)
        await gw.start()
        repo = AuditRepository(gw.store.engine)

        async def swept() -> bool:
            await gw.audit.flush()  # type: ignore[attr-defined]
            return bool((await repo.list(AuditQuery(action="retention.sweep")))[0])

        await _wait_for(swept, what="a retention.sweep entry")
    finally:
        await gw.stop()
    store = await Store.open(db_url)
    try:
        [entry], _ = await AuditRepository(store.engine).list(AuditQuery(action="retention.sweep"))
    finally:
        await store.close()
    assert isinstance(entry, SealedEntry)
    assert (entry.actor, entry.tenant_id, dict(entry.detail)) == (None, None, {"deleted": 2})
