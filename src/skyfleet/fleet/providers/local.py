"""The local provider: replica processes on this machine, started, watched and restarted.

Each replica is ``python -m skyfleet engine llama --port P ...`` (llama.cpp's own server). The
provider notices a process exit at once (it awaits the process), takes the replica out of
routing, and restarts it with exponential backoff. The health checker promotes it back to
READY once llama.cpp answers ``/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from skyfleet.config import LocalEngineSettings
from skyfleet.cost.pricing import Pricing
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState

log = logging.getLogger("skyfleet.provider.local")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalProvider:
    def __init__(self, settings: LocalEngineSettings, registry: ReplicaRegistry, data_dir: Path,
                 pricing: Pricing | None = None) -> None:
        self._settings = settings
        self._pricing = pricing  # the replicas' price (tier local, cost.local_usd_per_hour)
        self._registry = registry
        self._data_dir = data_dir
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def _command(self, port: int) -> list[str]:
        s = self._settings
        cmd = [
            sys.executable, "-m", "skyfleet", "engine", "llama",
            "--host", s.host, "--port", str(port), "--threads", str(s.threads), "--slots", str(s.slots),
            "--ctx-size", str(s.ctx_size), "--model-name", s.model_name,
            "--slot-dir", str(self._data_dir / "slots"),
        ]
        if s.model_path is not None:
            cmd += ["--model-path", str(s.model_path)]
        return cmd

    def _spec(self, index: int, port: int) -> ReplicaSpec:
        s = self._settings
        rid = f"local-{index}"
        price = self._pricing.for_replica(rid).usd_per_hour if self._pricing is not None else None
        return ReplicaSpec(
            id=rid,
            base_url=f"http://{s.host}:{port}",
            model=s.model_name,
            engine="llama",
            upstream_model=s.model_name,
            context_window=s.ctx_per_slot,
            usd_per_hour=price,
        )

    async def start(self) -> None:
        (self._data_dir / "logs").mkdir(parents=True, exist_ok=True)
        for i in range(self._settings.replicas):
            # Registered before the process exists, so readiness waits for it.
            self._registry.add(self._spec(i, 0), capacity=self._settings.slots)
            self._tasks.append(asyncio.create_task(self._supervise(i), name=f"supervise-local-{i}"))

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        port = free_port(self._settings.host)
        spec = self._spec(index, port)
        self._registry.replace_spec(spec)
        self._registry.set_state(spec.id, ReplicaState.STARTING)
        logfile = await asyncio.to_thread(open, self._data_dir / "logs" / f"{spec.id}.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(port), stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile
            )
        finally:
            logfile.close()
        entry = self._registry.get(spec.id)
        if entry is not None:
            entry.pid = proc.pid
        self._procs[spec.id] = proc
        log.info("replica started", extra={"replica_id": spec.id, "pid": proc.pid, "port": port})
        return proc

    async def _supervise(self, index: int) -> None:
        backoff = 0.5
        while not self._stopping:
            try:
                proc = await self._spawn(index)
            except OSError as exc:
                log.error("replica failed to start", extra={"replica_id": f"local-{index}", "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.restart_backoff_max_s)
                continue
            started = asyncio.get_running_loop().time()
            code = await proc.wait()
            replica_id = f"local-{index}"
            self._registry.set_state(replica_id, ReplicaState.STOPPED, f"process exited with {code}")
            if self._stopping:
                return
            entry = self._registry.get(replica_id)
            if entry is not None:
                entry.restarts += 1
            log.warning("replica exited; restarting", extra={"replica_id": replica_id, "exit_code": code})
            # A replica that ran a while gets a fresh backoff; one that dies at once backs off.
            if asyncio.get_running_loop().time() - started > 30:
                backoff = 0.5
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._settings.restart_backoff_max_s)

    def pids(self) -> dict[str, int]:
        return {rid: p.pid for rid, p in self._procs.items() if p.returncode is None}

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        for replica_id, proc in self._procs.items():
            if proc.returncode is None:
                self._registry.set_state(replica_id, ReplicaState.DRAINING)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [p.wait() for p in self._procs.values() if p.returncode is None]
        if waits:
            _, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=timeout_s)
            for proc in self._procs.values():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=2)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
