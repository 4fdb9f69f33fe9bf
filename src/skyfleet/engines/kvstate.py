"""KV state that follows a session: the seam, and llama.cpp's implementation with ``/slots``.

A :class:`KvState` is asked, for every request sent to a replica, to prepare that replica for
the request's (tenant, session) and to say which extra body fields pin the request to its state.

:class:`LlamaSlots` treats each llama.cpp slot as owned by one (tenant, session):

* a session that comes back to the replica holding its slot is pinned to it (``id_slot``): its
  prefix is still cached;
* a slot taken from another session is first saved to the shared slot directory, so that
  session can be restored later, here or on another replica, instead of re-prefilled;
* a session that arrives with a saved file (it was evicted, or moved because its replica
  scaled down or was preempted) is restored into its new slot;
* a slot handed to a different tenant is erased first, so no tenant's prompt ever reuses
  another tenant's cached prefix (no cache-timing side channel between tenants);
* every request to a llama.cpp replica is pinned: when all its slots are busy the request
  waits here for one (llama.cpp would queue it anyway), so the slot table always matches what
  each slot really holds.

This needs llama.cpp's cross-slot host-memory prompt cache off (``--cache-ram 0``; the local
provider's replicas run that way, see :mod:`skyfleet.engines.llamacpp`): with it, llama.cpp copies
idle slots to RAM and loads them into *any* slot whose prompt matches, whatever the slot table says.

Without the slot manager (``local.kv_slot_manager: false``) :class:`SoleTenantCache` stands in:
llama.cpp then picks slots by prompt similarity, blind to tenants, so a replica keeps its prompt
cache only while a single tenant uses it; once a second tenant's request reaches it, every request
to it goes with ``cache_prompt: false`` (nothing reused, so no cross-tenant timing signal) until the
replica restarts with empty caches. Single-tenant set-ups keep llama.cpp's caching.

vLLM/SGLang manage their prefix caches themselves (and LMCache-style offload would implement this
protocol by mapping sessions to its storage keys); for them :class:`NoKvState` adds nothing: the
proxy isolates tenants there with a per-tenant ``cache_salt`` (:mod:`skyfleet.gateway.cache_salt`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from skyfleet.clock import Clock
from skyfleet.engines.kvseal import SEALED_SUFFIX, SlotSealer, scratch_name
from skyfleet.fleet.replica import ReplicaSpec
from skyfleet.gateway.upstream import UpstreamClient

log = logging.getLogger("skyfleet.kvstate")

Owner = tuple[str, str | None]  # (tenant_id, session key or None for anonymous requests)


@dataclass(frozen=True, slots=True)
class KvLease:
    fields: dict[str, Any]  # merged into the request body sent to the replica
    release: Callable[[bool], None]  # call once when the request is over (True: it succeeded)


def _noop(ok: bool) -> None:
    return None


NO_LEASE = KvLease({}, _noop)


class KvState(Protocol):
    async def acquire(self, spec: ReplicaSpec, tenant_id: str, session: str | None) -> KvLease: ...
    def replica_gone(self, replica_id: str) -> None: ...
    async def evacuate(self, spec: ReplicaSpec) -> int: ...
    async def forget_tenant(self, tenant_id: str) -> int: ...


class NoKvState:
    async def acquire(self, spec: ReplicaSpec, tenant_id: str, session: str | None) -> KvLease:
        return NO_LEASE

    def replica_gone(self, replica_id: str) -> None:
        return None

    async def evacuate(self, spec: ReplicaSpec) -> int:
        return 0

    async def forget_tenant(self, tenant_id: str) -> int:
        return 0


@dataclass(slots=True)
class _Slot:
    owner: Owner | None = None
    busy: bool = False
    last_used: float = 0.0


class _Replica:
    """A replica's slot table. ``freed`` shares ``lock``: checking for a free slot and starting to
    wait for one are atomic, so no release can slip in between (no lost wake-ups)."""

    __slots__ = ("freed", "lock", "slots")

    def __init__(self, n: int) -> None:
        self.slots = [_Slot() for _ in range(n)]
        self.lock = asyncio.Lock()
        self.freed = asyncio.Condition(self.lock)


def delete_tenant_slot_files(slot_dir: Path, tenant_id: str) -> int:
    """Delete ``tenant_id``'s slot files in ``slot_dir`` (:func:`slot_file` names, sealed, scratch or temporary)."""
    pattern = re.compile(r"\.?" + re.escape(tenant_id) + r"-[0-9a-f]{40}(\.[^/]*)?")
    gone = 0
    if slot_dir.is_dir():
        for path in slot_dir.iterdir():
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                gone += 1
    return gone


def slot_file(tenant_id: str, session: str) -> str:
    """File name of a session's saved slot: tenant id (for deletion) + a hash of the session."""
    digest = hashlib.sha256(f"{tenant_id}\x00{session}".encode()).hexdigest()[:40]
    return f"{tenant_id}-{digest}.bin"


class LlamaSlots:
    """The slot manager. ``sealer``: saved slots sealed with the tenant's data key (the gateway's
    default, :mod:`skyfleet.engines.kvseal`); None keeps llama.cpp's plaintext files (unit tests)."""

    def __init__(self, upstream: UpstreamClient, slot_dir: Path, clock: Clock, *, slots_per_replica: int,
                 save_every_turn: bool = False, sealer: SlotSealer | None = None) -> None:
        self._upstream = upstream
        self._dir = slot_dir
        self._sealer = sealer
        self._clock = clock
        self._n = slots_per_replica
        self._save_every_turn = save_every_turn
        self._replicas: dict[str, _Replica] = {}
        self._saving: dict[str, asyncio.Future[None]] = {}  # slot files being written right now
        self.stats = {"pinned": 0, "restored": 0, "saved": 0, "erased": 0, "waited": 0}

    def _table(self, replica_id: str) -> _Replica:
        rep = self._replicas.get(replica_id)
        if rep is None:
            rep = self._replicas[replica_id] = _Replica(self._n)
        return rep

    def _file(self, owner: Owner) -> str:
        """The saved-slot file of a session owner (``owner[1]`` is not None)."""
        assert owner[1] is not None
        name = slot_file(owner[0], owner[1])
        return name if self._sealer is None else name.removesuffix(".bin") + SEALED_SUFFIX

    async def _save(self, spec: ReplicaSpec, idx: int, owner: Owner) -> bool:
        name = self._file(owner)
        if self._sealer is None:
            return await self._action(spec, idx, "save", name)
        scratch = scratch_name(name)
        if not await self._action(spec, idx, "save", scratch):
            await self._sealer.discard(scratch)
            return False
        return await self._sealer.seal(owner[0], scratch, name)

    async def _restore(self, spec: ReplicaSpec, idx: int, owner: Owner) -> bool:
        name = self._file(owner)
        if self._sealer is None:
            return await asyncio.to_thread((self._dir / name).exists) and await self._action(
                spec, idx, "restore", name)
        scratch = await self._sealer.open(owner[0], name)
        if scratch is None:
            return False
        try:
            return await self._action(spec, idx, "restore", scratch)
        finally:
            await self._sealer.discard(scratch)

    async def _action(self, spec: ReplicaSpec, idx: int, action: str, filename: str | None = None) -> bool:
        ok = await self._upstream.slot_action(spec, idx, action, filename)
        if ok:
            self.stats["saved" if action == "save" else "restored" if action == "restore" else "erased"] += 1
        return ok

    @staticmethod
    def _pick(slots: list[_Slot], owner: Owner) -> int | None:
        """The slot for ``owner``: its own (most recently used first), then an empty one, then one of
        the same tenant, then the least recently used; None when all are busy."""
        free = [i for i, s in enumerate(slots) if not s.busy]
        if not free:
            return None
        tenant = owner[0]

        def rank(i: int) -> tuple[int, float]:
            o = slots[i].owner
            if o == owner:
                return 0, -slots[i].last_used
            if o is None:
                return 1, 0.0
            if o[0] == tenant:
                return 2, slots[i].last_used
            return 3, slots[i].last_used

        return min(free, key=rank)

    async def acquire(self, spec: ReplicaSpec, tenant_id: str, session: str | None) -> KvLease:
        owner: Owner = (tenant_id, session)
        rep = self._table(spec.id)
        async with rep.freed:  # the table lock: held for bookkeeping only, never across I/O
            while (idx := self._pick(rep.slots, owner)) is None:
                self.stats["waited"] += 1
                await rep.freed.wait()
            slot = rep.slots[idx]
            previous, slot.owner, slot.busy = slot.owner, owner, True
            evicted = None
            if previous != owner and previous is not None and previous[1] is not None:
                evicted = previous
                self._saving[self._file(previous)] = asyncio.get_running_loop().create_future()
        try:
            if previous != owner:
                await self._hand_over(spec, idx, previous, owner, evicted)
        except BaseException:
            async with rep.freed:
                slot.owner, slot.busy = None, False  # unknown contents: nobody may reuse them
                rep.freed.notify(1)
            raise
        self.stats["pinned"] += 1
        return KvLease({"id_slot": idx}, lambda ok: self._release(spec, rep, idx, slot, ok))

    async def _hand_over(self, spec: ReplicaSpec, idx: int, previous: Owner | None, owner: Owner,
                         evicted: Owner | None) -> None:
        if evicted is not None:
            key = self._file(evicted)
            future = self._saving[key]
            try:
                await self._save(spec, idx, evicted)
            finally:
                if self._saving.get(key) is future:
                    del self._saving[key]
                future.set_result(None)
        restored = False
        if owner[1] is not None:
            if (pending := self._saving.get(self._file(owner))) is not None:
                await asyncio.shield(pending)  # this session is being saved from another slot right now
            restored = await self._restore(spec, idx, owner)
        if not restored and previous is not None and previous[0] != owner[0]:
            await self._action(spec, idx, "erase")

    @staticmethod
    def _notify_freed(rep: _Replica) -> None:
        async def notify() -> None:
            async with rep.freed:
                rep.freed.notify(1)

        asyncio.get_running_loop().create_task(notify())

    def _release(self, spec: ReplicaSpec, rep: _Replica, idx: int, slot: _Slot, ok: bool) -> None:
        slot.last_used = self._clock.now()
        if ok and self._save_every_turn and slot.owner is not None and slot.owner[1] is not None:
            asyncio.get_running_loop().create_task(self._save_then_free(spec, rep, idx, slot))
            return
        if not ok and slot.owner is not None:
            slot.owner = (slot.owner[0], None)  # state unknown after a failure: keep only the tenant
        slot.busy = False
        self._notify_freed(rep)

    async def _save_then_free(self, spec: ReplicaSpec, rep: _Replica, idx: int, slot: _Slot) -> None:
        try:  # the slot stays busy (reserved) while it is saved, so the table lock is not needed
            if slot.owner is not None and slot.owner[1] is not None:
                await self._save(spec, idx, slot.owner)
        finally:
            slot.busy = False
            self._notify_freed(rep)

    def replica_gone(self, replica_id: str) -> None:
        """A replica died or restarted: its slots are empty now (saved files remain).

        Requests waiting for one of its slots are woken; the proxy's retry sends them elsewhere
        once they fail to reach the replica."""
        rep = self._replicas.pop(replica_id, None)
        if rep is not None:
            for _ in rep.slots:
                self._notify_freed(rep)

    async def evacuate(self, spec: ReplicaSpec) -> int:
        """Save every idle session slot (before a scale-down, a preemption or a shutdown)."""
        rep = self._replicas.get(spec.id)
        if rep is None:
            return 0
        saved = 0
        async with rep.lock:
            for idx, slot in enumerate(rep.slots):
                if not slot.busy and slot.owner is not None and slot.owner[1] is not None:
                    saved += await self._save(spec, idx, slot.owner)
        return saved

    async def forget_tenant(self, tenant_id: str) -> int:
        """The tenant was deleted: delete its saved slot files here (sealed ones no longer open anyway:
        its keys are shredded) and forget which slots it held (they are erased before the next tenant's
        request uses them, as any other tenant's)."""
        for rep in self._replicas.values():
            for slot in rep.slots:  # busy ones too: their session is not saved when they are released
                if slot.owner is not None and slot.owner[0] == tenant_id:
                    slot.owner = (tenant_id, None)
        return await asyncio.to_thread(delete_tenant_slot_files, self._dir, tenant_id)


_SHARED = "\x00shared"  # no tenant id contains NUL
_NO_PROMPT_CACHE = KvLease({"cache_prompt": False}, _noop)


class SoleTenantCache:
    """llama.cpp without the slot manager: prompt reuse only while one tenant has used the replica."""

    def __init__(self) -> None:
        self._tenant: dict[str, str] = {}  # replica id -> its only tenant so far, or _SHARED
        self.stats = {"uncached": 0}

    async def acquire(self, spec: ReplicaSpec, tenant_id: str, session: str | None) -> KvLease:
        sole = self._tenant.setdefault(spec.id, tenant_id)  # no await: atomic on the loop
        if sole == tenant_id:
            return NO_LEASE
        if sole != _SHARED:
            self._tenant[spec.id] = _SHARED
            log.info("a second tenant reached a llama.cpp replica without the slot manager: its prompt cache "
                     "is off until it restarts", extra={"replica_id": spec.id})
        self.stats["uncached"] += 1
        return _NO_PROMPT_CACHE

    def replica_gone(self, replica_id: str) -> None:
        self._tenant.pop(replica_id, None)  # a restarted replica starts with empty caches

    async def evacuate(self, spec: ReplicaSpec) -> int:
        return 0

    async def forget_tenant(self, tenant_id: str) -> int:
        return 0


class KvRouter:
    """Dispatch to the KV-state implementation of each replica's engine."""

    def __init__(self, by_engine: dict[str, KvState]) -> None:
        self._by_engine = by_engine
        self._none = NoKvState()

    def _for(self, spec: ReplicaSpec) -> KvState:
        return self._by_engine.get(spec.engine, self._none)

    async def acquire(self, spec: ReplicaSpec, tenant_id: str, session: str | None) -> KvLease:
        return await self._for(spec).acquire(spec, tenant_id, session)

    def replica_gone(self, replica_id: str) -> None:
        for kv in self._by_engine.values():
            kv.replica_gone(replica_id)

    async def evacuate(self, spec: ReplicaSpec) -> int:
        return await self._for(spec).evacuate(spec)

    async def forget_tenant(self, tenant_id: str) -> int:
        """A tenant was deleted: drop what each engine kind keeps of it; how many saved files went."""
        return sum([await kv.forget_tenant(tenant_id) for kv in self._by_engine.values()])
