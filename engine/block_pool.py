"""BlockPool: the fixed set of KV blocks, their reference counts and the prefix cache.

A block is free when no request references it. A free block may still hold the KV of a
cached prefix (it keeps its hash): it can be revived by a later request with the same
prefix, or evicted, least recently freed first, when a fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventLog


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set while the block is registered in the prefix cache


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool, events: KVEventLog) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.events = events
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front = evicted first). OrderedDict gives O(1)
        # removal from the middle when a cached free block is revived.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, KVBlock] = {}  # block hash -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self._cached.get(block_hash)

    def cached_hashes(self) -> frozenset[int]:
        return frozenset(self._cached)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n fresh blocks (ref_cnt 1), evicting cached free blocks LRU as needed."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks: only {len(self._free)} free")
        out = []
        evicted = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        if evicted:
            self.events.record(BlockRemoved(tuple(evicted)))
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take another reference to cached blocks (a prefix-cache hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference to each block. Pass a request's blocks tail first: the tail
        of a prefix is the least likely to be shared, so it should be evicted first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def cache(self, blocks: list[KVBlock], hashes: list[int], parent_hash: int | None) -> None:
        """Register full blocks under their chained hashes (first one's parent given)."""
        if not self.enable_caching:
            return
        stored = []
        for block, block_hash in zip(blocks, hashes, strict=True):
            if block.block_hash is not None:
                continue
            if block_hash in self._cached:
                # Another request computed the same prefix into a different block first;
                # keep that one and leave this one uncached.
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block
            stored.append(block_hash)
        if stored:
            self.events.record(BlockStored(tuple(stored), parent_hash))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached free block; refused while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self.events.record(AllBlocksCleared())
        return True
