"""A replica's prefix cache: block hashes of prompts seen, evicted least recently used first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    """Which prompt blocks a replica has cached.

    Keys are the chained block hashes of :func:`skyfleet.engines.sim.text.block_hashes`, so a
    hit on block ``i`` means the whole prefix up to block ``i`` is cached. Capacity is counted
    in blocks; inserting past it evicts the least recently used blocks (a lookup that hits a
    block, or an insert of a cached block, makes it the most recently used). Blocks of one
    prompt are touched deepest first, so a prompt's first block is more recent than its last
    and eviction trims prefixes from the end (like vLLM) instead of orphaning whole chains.
    """

    __slots__ = ("_blocks", "_capacity")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity must not be negative")
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        return block in self._blocks

    @property
    def capacity(self) -> int:
        return self._capacity

    def match(self, hashes: Sequence[bytes], limit: int | None = None) -> int:
        """How many leading blocks of ``hashes`` (at most ``limit``) are cached; touches them."""
        blocks = self._blocks
        n = len(hashes) if limit is None else min(limit, len(hashes))
        hit = 0
        while hit < n and hashes[hit] in blocks:
            hit += 1
        for i in range(hit - 1, -1, -1):
            blocks.move_to_end(hashes[i])
        return hit

    def insert(self, hashes: Sequence[bytes]) -> int:
        """Cache ``hashes`` as the most recently used blocks; returns how many blocks were evicted."""
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        evicted = 0
        while len(blocks) > self._capacity:
            blocks.popitem(last=False)
            evicted += 1
        return evicted
