"""The local provider: replica processes on this machine, in pools, started, watched, drained and restarted.

Each replica is ``python -m skyfleet engine llama --port P ...`` (llama.cpp's own server; ``sim`` pools run
the simulated engine instead). It implements :class:`~skyfleet.fleet.providers.base.FleetProvider`:

* **Pools** are keyed like the controller's (``<model>/<pool>``); without a fleet spec there is one pool,
  ``local``, of ``local.replicas`` replicas (ids ``local-0``, ``local-1``, ...). A spec pool's replicas are
  ``<pool>-<ordinal>``; a scale-up takes the lowest free ordinals, a scale-down the highest (as a
  StatefulSet does), after any replica already draining.
* **A process exit** is noticed at once (the provider awaits the process): the replica leaves routing and is
  restarted with exponential backoff. The health checker promotes it back to READY once ``/health`` answers.
* **Retiring** a replica (scale-down, drain, preemption): out of routing at once (DRAINING), in-flight
  requests finish (up to ``grace_s``, or the preemption deadline), then the ``before_stop`` hooks run (the
  gateway saves the replica's idle session slots so they move with their sessions), then SIGTERM (SIGKILL
  after 5 s). The pool, if now below its desired size, starts a replacement at once.
* **Simulated spot preemption** (:meth:`preempt`; ``skyfleet fleet preempt``): the replica gets a notice
  with a deadline (AWS gives 2 minutes, GCP 30 s), reported on :meth:`events`; optionally the pool's spot
  capacity is gone for a while, so that its replacement cannot start there
  (:class:`InsufficientCapacityError`) and the controller falls back to an on-demand pool.
* **Cold start**: the time from a replica being asked for to READY is kept (:meth:`cold_starts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from skyfleet.clock import Clock, SystemClock
from skyfleet.config import LocalEngineSettings
from skyfleet.cost.pricing import Pricing, ReplicaCost
from skyfleet.fleet.providers.base import (
    InsufficientCapacityError,
    PoolNotFoundError,
    PreemptionNotice,
    ReplicaInfo,
    ReplicaNotFoundError,
)
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState

log = logging.getLogger("skyfleet.provider.local")

#: The pool of the fixed local replicas (no fleet spec).
DEFAULT_POOL = "local"
#: How often a draining replica's in-flight count is looked at (the registry does not signal releases).
_DRAIN_POLL_S = 0.05
#: Cold-start times kept per pool.
_COLD_STARTS_KEPT = 50

ReplicaHook = Callable[[ReplicaSpec], Awaitable[None]]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class LocalPoolSpec:
    """One pool of local replicas."""

    key: str  # the controller's key: "<model>/<pool>" (DEFAULT_POOL for the fixed replicas)
    model: str  # name clients use
    name: str  # pool name, as in the fleet spec and the cost records
    tier: str  # local | spot | on-demand
    usd_per_hour: float | None
    engine: str = "llama"  # llama, or sim (the simulated engine, for larger fleets in tests)
    id_prefix: str = ""  # replica ids are "<id_prefix>-<ordinal>"; default: the pool name
    engine_args: tuple[str, ...] = ()  # extra `skyfleet engine ...` arguments


@dataclass(slots=True)
class _Pool:
    spec: LocalPoolSpec
    desired: int = 0
    no_capacity_until: float | None = None  # clock.now(): simulated spot capacity outage
    cold_starts: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Replica:
    id: str
    pool: str  # pool key
    ordinal: int
    requested_at: float  # clock.now() when it was asked for
    started_at: datetime
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    retiring: bool = False
    deadline: datetime | None = None
    detail: str = ""
    ready_once: bool = False


class LocalProvider:
    def __init__(self, settings: LocalEngineSettings, registry: ReplicaRegistry, data_dir: Path,
                 pricing: Pricing | None = None, clock: Clock | None = None, *, grace_s: float = 30.0) -> None:
        self._settings = settings
        self._pricing = pricing  # each replica's price (tier local: cost.local_usd_per_hour)
        self._registry = registry
        self._data_dir = data_dir
        self._clock = clock or SystemClock()
        self._grace_s = grace_s
        self._pools: dict[str, _Pool] = {}
        self._replicas: dict[str, _Replica] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._events: asyncio.Queue[PreemptionNotice] = asyncio.Queue()
        self._stopping = False
        #: Run before a retiring replica's process is stopped (the gateway saves its session slots).
        self.before_stop: list[ReplicaHook] = []
        #: Run when a replica is created (priced, its cost interval opened) and when it is gone for good.
        self.on_added: list[ReplicaHook] = []
        self.on_removed: list[ReplicaHook] = []
        #: Called with (pool name, seconds from request to READY) for each new replica (metrics).
        self.on_cold_start: list[Callable[[str, float], None]] = []
        registry.on_ready.append(self._ready)

    # -- pools -----------------------------------------------------------------------------------
    def add_pool(self, spec: LocalPoolSpec) -> None:
        self._pools[spec.key] = _Pool(spec)

    def pools(self) -> list[LocalPoolSpec]:
        return [p.spec for p in self._pools.values()]

    async def start(self) -> None:
        """Start the fixed replicas (``local.replicas``) when no pool was added (no fleet spec)."""
        (self._data_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not self._pools and self._settings.replicas > 0:
            s = self._settings
            usd = _fixed_price(self._pricing, s.model_name)
            self.add_pool(LocalPoolSpec(DEFAULT_POOL, s.model_name, DEFAULT_POOL, "local", usd,
                                        id_prefix=DEFAULT_POOL))
            await self.set_replicas(DEFAULT_POOL, s.replicas)

    def _pool(self, key: str) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            raise PoolNotFoundError(f"no local pool '{key}'; pools: {', '.join(sorted(self._pools)) or 'none'}")
        return pool

    def _active(self, key: str) -> list[_Replica]:
        return sorted((r for r in self._replicas.values() if r.pool == key and not r.retiring),
                      key=lambda r: r.ordinal)

    # -- FleetProvider -----------------------------------------------------------------------------
    async def set_replicas(self, pool: str, n: int) -> None:
        if n < 0:
            raise ValueError("a pool's size cannot be negative")
        p = self._pool(pool)
        p.desired = n
        self._reconcile(p)

    def _reconcile(self, p: _Pool) -> None:
        if self._stopping:
            return
        active = self._active(p.spec.key)
        for r in active[p.desired:][::-1]:  # the highest ordinals go
            self._retire(r, self._grace_s, "scaled down")
        missing = p.desired - len(active)
        if missing <= 0:
            return
        now = self._clock.now()
        if p.no_capacity_until is not None and now < p.no_capacity_until:
            raise InsufficientCapacityError(
                f"pool '{p.spec.key}': no {p.spec.tier} capacity for {missing} more replica(s) "
                f"(for another {p.no_capacity_until - now:.0f} s)")
        used = {r.ordinal for r in self._replicas.values() if r.pool == p.spec.key}
        ordinal = 0
        for _ in range(missing):
            while ordinal in used:
                ordinal += 1
            used.add(ordinal)
            self._launch(p, ordinal)

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        self._pool(pool)
        out = []
        for r in sorted((r for r in self._replicas.values() if r.pool == pool), key=lambda r: r.ordinal):
            entry = self._registry.get(r.id)
            state = ReplicaState.DRAINING if r.retiring else (entry.state if entry else ReplicaState.STARTING)
            out.append(ReplicaInfo(id=r.id, pool=pool, state=state,
                                   base_url=entry.spec.base_url if entry else None, ordinal=r.ordinal,
                                   node=socket.gethostname(), started_at=r.started_at, deadline=r.deadline,
                                   detail=r.detail))
        return out

    async def drain(self, replica_id: str) -> None:
        r = self._replicas.get(replica_id)
        if r is None:
            raise ReplicaNotFoundError(f"no local replica '{replica_id}'")
        self._retire(r, self._grace_s, "drained")

    async def delete_replica(self, replica_id: str) -> None:
        r = self._replicas.get(replica_id)
        if r is None:
            raise ReplicaNotFoundError(f"no local replica '{replica_id}'")
        self._retire(r, 0.0, "deleted")
        p = self._pools.get(r.pool)
        if p is not None:
            self._reconcile(p)

    async def events(self) -> AsyncIterator[PreemptionNotice]:
        while True:
            yield await self._events.get()

    # -- simulated preemption ----------------------------------------------------------------------
    async def preempt(self, replica_id: str, *, notice_s: float = 120.0,
                      capacity_gone_s: float = 0.0) -> PreemptionNotice:
        """Simulate a spot reclaim of ``replica_id``: gone ``notice_s`` from now; the pool cannot start
        replicas for ``capacity_gone_s`` (0: a replacement starts in the same pool at once)."""
        r = self._replicas.get(replica_id)
        if r is None or r.retiring:
            raise ReplicaNotFoundError(f"no running local replica '{replica_id}'")
        p = self._pools[r.pool]
        deadline = datetime.now(UTC) + timedelta(seconds=notice_s)
        notice = PreemptionNotice(replica_id=replica_id, pool=r.pool, deadline=deadline,
                                  reason="preempted (simulated spot reclaim)")
        if capacity_gone_s > 0:
            p.no_capacity_until = self._clock.now() + capacity_gone_s
        r.deadline = deadline
        self._retire(r, notice_s, "preempted")
        self._events.put_nowait(notice)
        with contextlib.suppress(InsufficientCapacityError):  # the controller sees it on its next round
            self._reconcile(p)
        return notice

    def cold_starts(self, pool: str) -> list[float]:
        """Seconds from asking for a replica to READY, most recent last."""
        return list(self._pool(pool).cold_starts)

    # -- processes ---------------------------------------------------------------------------------
    def _command(self, p: LocalPoolSpec, port: int) -> list[str]:
        s = self._settings
        if p.engine == "sim":
            return [sys.executable, "-m", "skyfleet", "engine", "sim", "--host", s.host, "--port", str(port),
                    "--model", s.model_name, *p.engine_args]
        cmd = [
            sys.executable, "-m", "skyfleet", "engine", "llama",
            "--host", s.host, "--port", str(port), "--threads", str(s.threads), "--slots", str(s.slots),
            "--ctx-size", str(s.ctx_size), "--model-name", s.model_name,
            "--slot-dir", str(self._data_dir / "slots"),
        ]
        if s.model_path is not None:
            cmd += ["--model-path", str(s.model_path)]
        return cmd + list(p.engine_args)

    def _spec(self, p: LocalPoolSpec, rid: str, port: int) -> ReplicaSpec:
        s = self._settings
        return ReplicaSpec(
            id=rid, base_url=f"http://{s.host}:{port}", model=p.model, engine=p.engine,
            upstream_model=s.model_name, context_window=s.ctx_per_slot if p.engine == "llama" else None,
            pool=p.name, tier=p.tier, instance_type="local" if p.tier != "local" else None,
            region="local" if p.tier != "local" else None, usd_per_hour=p.usd_per_hour,
        )

    def _launch(self, p: _Pool, ordinal: int) -> None:
        rid = f"{p.spec.id_prefix or p.spec.name}-{ordinal}"
        r = _Replica(rid, p.spec.key, ordinal, self._clock.now(), datetime.now(UTC))
        self._replicas[rid] = r
        # Registered before the process exists, so readiness waits for it.
        self._registry.add(self._spec(p.spec, rid, 0), capacity=self._settings.slots if p.spec.engine == "llama"
                           else 64)
        if self._pricing is not None and p.spec.usd_per_hour is not None:
            self._pricing.add(ReplicaCost(replica_id=rid, pool=p.spec.name, model=p.spec.model, tier=p.spec.tier,
                                          usd_per_hour=p.spec.usd_per_hour, engine=p.spec.engine))
        r.task = asyncio.create_task(self._supervise(p.spec, r), name=f"supervise-{rid}")
        for hook in self.on_added:
            self._spawn_hook(hook, rid)
        log.info("replica requested", extra={"replica_id": rid, "pool": p.spec.key})

    def _spawn_hook(self, hook: ReplicaHook, rid: str) -> None:
        entry = self._registry.get(rid)
        if entry is None:
            return
        task = asyncio.create_task(_guarded(hook, entry.spec), name=f"hook-{rid}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _ready(self, replica_id: str) -> None:
        r = self._replicas.get(replica_id)
        if r is None or r.ready_once:
            return
        r.ready_once = True
        p = self._pools.get(r.pool)
        if p is not None:
            cold = self._clock.now() - r.requested_at
            p.cold_starts = [*p.cold_starts, cold][-_COLD_STARTS_KEPT:]
            for callback in self.on_cold_start:
                callback(p.spec.name, cold)
            log.info("replica ready", extra={"replica_id": replica_id, "cold_start_s": round(cold, 3)})

    async def _spawn(self, p: LocalPoolSpec, r: _Replica) -> asyncio.subprocess.Process:
        port = free_port(self._settings.host)
        spec = self._spec(p, r.id, port)
        self._registry.replace_spec(spec)
        self._registry.set_state(spec.id, ReplicaState.STARTING)
        logfile = await asyncio.to_thread(open, self._data_dir / "logs" / f"{spec.id}.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(p, port), stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile
            )
        finally:
            logfile.close()
        entry = self._registry.get(spec.id)
        if entry is not None:
            entry.pid = proc.pid
        r.proc = proc
        log.info("replica started", extra={"replica_id": spec.id, "pid": proc.pid, "port": port})
        return proc

    async def _supervise(self, p: LocalPoolSpec, r: _Replica) -> None:
        backoff = 0.5
        while not (self._stopping or r.retiring):
            try:
                proc = await self._spawn(p, r)
            except OSError as exc:
                log.error("replica failed to start", extra={"replica_id": r.id, "error": str(exc)})
                r.detail = f"failed to start: {exc.strerror or exc}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.restart_backoff_max_s)
                continue
            started = asyncio.get_running_loop().time()
            code = await proc.wait()
            if self._stopping or r.retiring:
                return
            self._registry.set_state(r.id, ReplicaState.STOPPED, f"process exited with {code}")
            entry = self._registry.get(r.id)
            if entry is not None:
                entry.restarts += 1
            r.detail = f"restarting: exited with {code}"
            log.warning("replica exited; restarting", extra={"replica_id": r.id, "exit_code": code})
            # A replica that ran a while gets a fresh backoff; one that dies at once backs off.
            if asyncio.get_running_loop().time() - started > 30:
                backoff = 0.5
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._settings.restart_backoff_max_s)

    def _retire(self, r: _Replica, grace_s: float, why: str) -> None:
        if r.retiring:
            if grace_s < self._grace_s and r.deadline is None:  # a preemption shortens a drain
                r.deadline = datetime.now(UTC) + timedelta(seconds=grace_s)
            return
        r.retiring, r.detail = True, why
        self._registry.set_state(r.id, ReplicaState.DRAINING, why)  # out of routing now
        log.info("replica retiring", extra={"replica_id": r.id, "detail": why})
        task = asyncio.create_task(self._stop_replica(r, grace_s), name=f"retire-{r.id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _stop_replica(self, r: _Replica, grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        while loop.time() < until:  # in-flight requests finish
            entry = self._registry.get(r.id)
            if entry is None or entry.outstanding == 0:
                break
            await asyncio.sleep(_DRAIN_POLL_S)
        entry = self._registry.get(r.id)
        if entry is not None and r.proc is not None and r.proc.returncode is None:
            for hook in self.before_stop:  # save its sessions' KV state while the engine still answers
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_guarded(hook, entry.spec), max(1.0, until - loop.time()))
        await self._terminate(r)
        if r.task is not None:
            r.task.cancel()
            await asyncio.gather(r.task, return_exceptions=True)
        entry = self._registry.get(r.id)
        self._registry.set_state(r.id, ReplicaState.STOPPED, r.detail)
        self._registry.remove(r.id)
        self._replicas.pop(r.id, None)
        if entry is not None:
            for hook in self.on_removed:
                await _guarded(hook, entry.spec)
        log.info("replica stopped", extra={"replica_id": r.id, "detail": r.detail})

    @staticmethod
    async def _terminate(r: _Replica, timeout_s: float = 5.0) -> None:
        proc = r.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 2.0)

    def pids(self) -> dict[str, int]:
        return {r.id: r.proc.pid for r in self._replicas.values() if r.proc is not None and r.proc.returncode is None}

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        for r in self._replicas.values():
            if r.proc is not None and r.proc.returncode is None:
                self._registry.set_state(r.id, ReplicaState.DRAINING)
                with contextlib.suppress(ProcessLookupError):
                    r.proc.send_signal(signal.SIGTERM)
        procs = [r.proc for r in self._replicas.values() if r.proc is not None and r.proc.returncode is None]
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout_s)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=2)
        tasks = [r.task for r in self._replicas.values() if r.task is not None] + list(self._retiring)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fixed_price(pricing: Pricing | None, model: str) -> float | None:
    """The price of a fixed local replica (``cost.local_usd_per_hour``, through the pricing)."""
    if pricing is None:
        return None
    for c in pricing.replica_costs():
        if c.tier == "local" and c.model == model:
            return c.usd_per_hour
    return None


async def _guarded(hook: ReplicaHook, spec: ReplicaSpec) -> None:
    try:
        await hook(spec)
    except Exception:  # a hook (saving slots, an interval) must never stop a replica's retirement
        log.exception("replica hook failed", extra={"replica_id": spec.id})
