"""Session affinity: consistent hashing with bounded loads, keyed by ``(tenant_id, session_key)``.

Algorithm (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018;
the variant HAProxy and Vimeo run):

* Every replica owns ``vnodes`` points on a 64-bit hash ring (BLAKE2b of ``replica_id`` and
  the point's number; never Python's per-process ``hash()``). A request's key is the BLAKE2b
  hash of its tenant and session key, so the same session id of two tenants lands on
  unrelated points and never shares placement.
* Walking clockwise from the key's point gives the key's *preference order* of replicas. The
  request goes to the first replica in that order whose load is under the bound; excluded
  replicas (already tried) are skipped.
* The bound, in requests, for replica ``i`` with capacity ``w_i`` is
  ``ceil(load_factor * w_i * T / W)``, where ``T`` is the total load of the candidates
  *including this request* and ``W`` their total capacity; a replica is eligible while its
  load is below its bound. With every capacity 1 this is exactly the paper's
  ``ceil(c * m / n)``. Load is the numerator least-outstanding uses, ``outstanding +
  engine_waiting``; capacity normalises it (``max(1, capacity)``). Since the bounds sum to at
  least ``T`` (``load_factor >= 1``), some candidate is always eligible: the walk never fails.

Consequences: while loads stay under the bound every session sits on its first preference, so
a replica leaving moves only the sessions that were on it, and a replica joining takes about
``1/N`` of the sessions (those whose new first preference it is). Under load a hot session
spills to its next preference instead of overloading one replica, so the maximum load stays
within ``ceil(load_factor * mean)``.

Requests without a session key (``None`` or ``""``) fall back to least-outstanding.

Purity: ``choose`` depends only on ``(snapshot, request)`` and the constructor's parameters. The
ring is a pure function of the *set* of replica ids, memoised in a small bounded dict (a cache,
not decision state), so the order of ``snapshot.replicas`` never changes a decision.

Prefix affinity (:class:`PrefixAffinity`) is the same policy with a session key derived from
the start of the prompt instead of a client-supplied id; see :func:`prefix_key` and
:func:`prefix_key_from_text` for how a gateway derives it.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Sequence
from fractions import Fraction

from skyfleet.routing.least_load import LeastOutstandingRequests
from skyfleet.routing.policy import RouteRequest, RoutingSnapshot

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "DEFAULT_VNODES",
    "HashRing",
    "PrefixAffinity",
    "SessionAffinity",
    "affinity_hash",
    "prefix_key",
    "prefix_key_from_text",
    "prefix_partition",
]

DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_VNODES = 160
_RING_MEMO_SIZE = 32
_PERSON_NODE = b"skyfleet-vnode"
_PERSON_KEY = b"skyfleet-key"
_PERSON_PREFIX = b"skyfleet-prefix"


def _h64(data: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "big")


def affinity_hash(tenant_id: str, session_key: str) -> int:
    """The ring position of a session: stable across processes, machines and Python versions.

    The tenant is length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` hash apart.
    """
    tenant = tenant_id.encode("utf-8", "surrogatepass")
    return _h64(
        len(tenant).to_bytes(4, "big") + tenant + session_key.encode("utf-8", "surrogatepass"), _PERSON_KEY
    )


class HashRing:
    """The consistent-hash ring of one set of replica ids (immutable once built)."""

    __slots__ = ("ids", "index", "owners", "points")

    def __init__(self, replica_ids: frozenset[str] | Sequence[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.ids: tuple[str, ...] = tuple(sorted(set(replica_ids)))
        self.index: dict[str, int] = {rid: i for i, rid in enumerate(self.ids)}
        ring = sorted(
            (_h64(f"{rid}\x00{v}".encode("utf-8", "surrogatepass"), _PERSON_NODE), i)
            for i, rid in enumerate(self.ids)
            for v in range(vnodes)
        )
        self.points: list[int] = [p for p, _ in ring]
        self.owners: list[int] = [i for _, i in ring]

    def preference(self, key_hash: int) -> list[str]:
        """Every replica id in clockwise order from ``key_hash`` (the walk ``choose`` takes)."""
        seen: list[int] = []
        n, start = len(self.points), bisect_left(self.points, key_hash)
        for step in range(n):
            owner = self.owners[(start + step) % n]
            if owner not in seen:
                seen.append(owner)
                if len(seen) == len(self.ids):
                    break
        return [self.ids[i] for i in seen]


class SessionAffinity:
    """Consistent hashing with bounded loads on ``(tenant_id, session_key)``.

    ``load_factor`` (``c >= 1``) trades balance for stickiness: a replica takes a request only
    while its load is below ``ceil(c * its share of the total load after placing it)``. ``1.0``
    is perfectly balanced and moves sessions often; large values approach plain consistent
    hashing. ``vnodes`` points per replica smooth the ring (160 keeps the key-share spread of
    8 replicas within a few percent).
    """

    __slots__ = ("_c_den", "_c_num", "_fallback", "_rings", "load_factor", "vnodes")

    def __init__(self, load_factor: float = DEFAULT_LOAD_FACTOR, vnodes: int = DEFAULT_VNODES) -> None:
        if not load_factor >= 1.0 or math.isinf(load_factor):
            raise ValueError("load_factor must be a finite number >= 1")
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        self.load_factor = float(load_factor)
        self.vnodes = int(vnodes)
        c = Fraction(self.load_factor).limit_denominator(1_000_000)  # 1.1 -> 11/10, exactly
        self._c_num, self._c_den = c.numerator, c.denominator
        self._fallback = LeastOutstandingRequests()
        self._rings: dict[frozenset[str], HashRing] = {}

    def ring(self, replica_ids: frozenset[str]) -> HashRing:
        """The ring of this id set, memoised (a bounded cache of a pure function)."""
        ring = self._rings.get(replica_ids)
        if ring is None:
            ring = HashRing(replica_ids, self.vnodes)
            rings = self._rings
            try:
                while len(rings) >= _RING_MEMO_SIZE:  # drop the oldest entries
                    rings.pop(next(iter(rings)), None)
            except (RuntimeError, StopIteration):  # another thread resized it meanwhile: harmless
                pass
            rings[replica_ids] = ring
        return ring

    def choose(self, snapshot: RoutingSnapshot, request: RouteRequest) -> str | None:
        if not request.session_key:
            return self._fallback.choose(snapshot, request)
        replicas = snapshot.replicas
        exclude = request.exclude
        ring = self.ring(frozenset([r.replica_id for r in replicas]))
        n = len(ring.ids)
        if not n:
            return None
        # Per ring index: (load, capacity) of candidates; None for excluded replicas.
        state: list[tuple[float, int] | None] = [None] * n
        total = 1.0  # this request
        weight = 0
        index = ring.index
        for r in replicas:
            if r.replica_id in exclude:
                continue
            cap = r.capacity if r.capacity > 1 else 1
            load = r.outstanding + r.engine_waiting
            i = index[r.replica_id]
            previous = state[i]
            if previous is not None:  # a duplicated id: the last entry wins, as for the ring
                total -= previous[0]
                weight -= previous[1]
            state[i] = (load, cap)
            total += load
            weight += cap
        if not weight:
            return None
        num, den = self._c_num, self._c_den
        integral = float(total).is_integer()
        t_int = int(total)
        den_w = den * weight
        points, owners = ring.points, ring.owners
        size = len(points)
        pos = bisect_left(points, affinity_hash(request.tenant_id, request.session_key))
        for step in range(size):
            owner = owners[(pos + step) % size]
            st = state[owner]
            if st is None:
                continue
            load, cap = st
            # ceil(c * cap * T / W): exact in integers; floats only for a fractional engine_waiting
            bound = -(-(num * cap * t_int) // den_w) if integral else math.ceil(num * cap * total / den_w)
            if load < bound:
                return ring.ids[owner]
            state[owner] = None  # over the bound: skip its other points
        return None  # unreachable for load_factor >= 1 (the bounds sum to at least T)


class PrefixAffinity(SessionAffinity):
    """:class:`SessionAffinity` keyed by the start of the prompt: prefix-cache-aware routing.

    The policy itself is identical; what differs is the session key, which the gateway derives
    from the prompt rather than taking from the client: :meth:`key_for_blocks` (the first
    ``prefix_blocks`` block hashes after ``skip_blocks`` globally shared ones) or
    :meth:`key_for_text`. Requests that share that prefix (the turns of one conversation, the
    questions about one document) land on the replica that already holds its KV cache, unless
    it is over the load bound. ``choose`` mixes in ``tenant_id``, so two tenants sending the
    same document are placed independently and never share a cache by construction. Pass
    :func:`prefix_partition` as the tenant: tenants that opted in to sharing public prefixes
    (whose engines also get one shared cache salt) then share one partition, among themselves only.
    """

    __slots__ = ("prefix_blocks", "skip_blocks")

    def __init__(
        self,
        prefix_blocks: int = 1,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        vnodes: int = DEFAULT_VNODES,
        skip_blocks: int = 0,
    ) -> None:
        if prefix_blocks < 1 or skip_blocks < 0:
            raise ValueError("prefix_blocks must be >= 1 and skip_blocks >= 0")
        super().__init__(load_factor=load_factor, vnodes=vnodes)
        self.prefix_blocks = prefix_blocks
        self.skip_blocks = skip_blocks

    def key_for_blocks(self, block_hashes: Sequence[object]) -> str | None:
        return prefix_key(block_hashes, self.prefix_blocks, self.skip_blocks)

    def key_for_text(self, text: str, block_chars: int = 2048) -> str | None:
        return prefix_key_from_text(text, self.prefix_blocks, block_chars, self.skip_blocks * block_chars)


#: The routing partition of every tenant that opted in to sharing public prefixes (no tenant id has a NUL).
PUBLIC_PREFIX_PARTITION = "\x00public-prefix"


def prefix_partition(tenant_id: str, share_public_prefix: bool = False) -> str:
    """The ``tenant_id`` to route a prompt-prefix key under: the tenant's own partition, or the one
    that all tenants with ``share_public_prefix`` share (they share a cache salt too)."""
    return PUBLIC_PREFIX_PARTITION if share_public_prefix else tenant_id


def _block_bytes(block: object) -> bytes:
    if isinstance(block, bytes):
        return block
    return str(block).encode("utf-8", "surrogatepass")


def prefix_key(block_hashes: Sequence[object], prefix_blocks: int = 1, skip_blocks: int = 0) -> str | None:
    """A session key from prefix-block hashes: blocks ``[skip_blocks, skip_blocks + prefix_blocks)``.

    ``block_hashes`` are the prompt's prefix-cache block hashes (bytes, ints or strings), in
    order. ``skip_blocks`` drops a prefix every request shares (a global system prompt):
    keying on it would send everything to one replica. Returns ``None`` (no affinity: the
    policy falls back to least-outstanding) when the prompt has no block past the skipped ones,
    since such a request shares nothing specific with any other.

    Small ``prefix_blocks`` (1) keeps a whole conversation or document on one key; larger
    values split groups that diverge after the first block (e.g. different questions about the
    same long document) across replicas, trading hits for spread.
    """
    if prefix_blocks < 1 or skip_blocks < 0:
        raise ValueError("prefix_blocks must be >= 1 and skip_blocks >= 0")
    blocks = block_hashes[skip_blocks : skip_blocks + prefix_blocks]
    if not blocks:
        return None
    h = hashlib.blake2b(digest_size=16, person=_PERSON_PREFIX)
    for b in blocks:
        data = _block_bytes(b)
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.hexdigest()


def prefix_key_from_text(
    text: str, prefix_blocks: int = 1, block_chars: int = 2048, skip_chars: int = 0
) -> str | None:
    """A session key from the start of a prompt's text, for a gateway that does not tokenize.

    The key is the hash of ``text[skip_chars : skip_chars + prefix_blocks * block_chars]``
    (2,048 characters is about one 512-token block at ~4 characters per token). The tenant is
    not part of the key; :meth:`SessionAffinity.choose` mixes ``tenant_id`` in.

    How a gateway uses it: render the part of the request that is stable across a
    conversation's turns - for chat, the system prompt plus the *first* user message; for
    completions, the prompt - and pass that text. A window longer than that stable part would
    change with every turn and scatter the conversation, so keep ``prefix_blocks`` small; set
    ``skip_chars`` past a system prompt that all of a tenant's traffic shares. Returns ``None``
    when nothing is left after ``skip_chars``.
    """
    if prefix_blocks < 1 or block_chars < 1 or skip_chars < 0:
        raise ValueError("prefix_blocks and block_chars must be >= 1, skip_chars >= 0")
    window = text[skip_chars : skip_chars + prefix_blocks * block_chars]
    if not window:
        return None
    h = hashlib.blake2b(window.encode("utf-8", "surrogatepass"), digest_size=16, person=_PERSON_PREFIX)
    return h.hexdigest()
