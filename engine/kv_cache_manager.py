"""KVCacheManager: each request's block table, prefix-cache lookups, and CPU swap space.

Blocks are reference counted: requests that share a cached prefix point at the same
blocks. Full blocks are registered in the prefix cache under chained hashes as soon as the
step that computes them is scheduled (every layer writes a step's KV before it attends, so
a request scheduled in the same step may already read them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .block_hash import ROOT_HASH, hash_block
from .block_pool import BlockPool, KVBlock
from .kv_events import KVEventLog, KVSnapshot
from .request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which served from the cache


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        num_cpu_blocks: int = 0,
        enable_kv_events: bool = True,
        hash_extra_keys: str = "",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_extra_keys = hash_extra_keys
        self.events = KVEventLog(enabled=enable_kv_events)
        self.pool = BlockPool(num_blocks, enable_caching, self.events)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks registered per request
        self.stats = PrefixCacheStats()
        # Swap space: CPU block ids holding swapped-out requests' KV.
        self.num_cpu_blocks = num_cpu_blocks
        self._free_cpu_blocks = list(range(num_cpu_blocks - 1, -1, -1))
        self.swapped_blocks: dict[str, list[int]] = {}

    # ---- queries -------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def snapshot(self) -> KVSnapshot:
        self.events.flush()
        return KVSnapshot(self.events.epoch, self.events.last_seq, self.pool.cached_hashes())

    def _update_hashes(self, request: Request) -> None:
        """Extend the request's chained hashes to cover every full block of its tokens."""
        hashes = request.block_hashes
        num_full = request.num_tokens // self.block_size
        if len(hashes) >= num_full:
            return
        tokens = request.all_token_ids
        parent = hashes[-1] if hashes else ROOT_HASH
        bs = self.block_size
        for i in range(len(hashes), num_full):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs], self.hash_extra_keys)
            hashes.append(parent)

    def _cached_prefix(self, request: Request) -> list[KVBlock]:
        """The request's leading blocks in the prefix cache, leaving at least its last token
        to compute (its logits pick the next token). Touches no block and counts nothing."""
        self._update_hashes(request)
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[: (request.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def num_cached_prefix_tokens(self, request: Request) -> int:
        """Tokens `get_computed_blocks` would find cached right now, without counting a
        prefix-cache query: an estimate for load reports."""
        if not self.enable_caching or request.needs_prompt_logprobs:
            return 0
        return len(self._cached_prefix(request)) * self.block_size

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Leading blocks of a new (or recomputing) request already in the prefix cache
        (none for a request still computing prompt logprobs)."""
        if not self.enable_caching or request.needs_prompt_logprobs:
            return [], 0
        hits = self._cached_prefix(request)
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ---- allocation ----------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[KVBlock] | None = None,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens; None (and no change) if blocks run out.

        `computed_blocks` are prefix-cache hits for a request being scheduled from scratch.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.get(request.request_id)
        if blocks is None:
            blocks = []
        elif computed_blocks:
            raise ValueError(f"request {request.request_id} already has blocks")
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = -(-total // self.block_size) - len(blocks) - len(computed_blocks)
        # Cached hits sitting in the free list are about to be taken: they are not room.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            return None
        self.pool.touch(computed_blocks)
        blocks = blocks + computed_blocks
        if num_needed > 0:
            blocks = blocks + self.pool.allocate(num_needed)
        self.req_blocks[request.request_id] = blocks
        if computed_blocks:
            self._num_cached_blocks[request.request_id] = len(computed_blocks)
        self._cache_full_blocks(request, blocks, total)
        return [b.block_id for b in blocks]

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request)
        hashes = request.block_hashes
        parent = hashes[start - 1] if start > 0 else None
        self.pool.cache(blocks[start:num_full], hashes[start:num_full], parent)
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release every block the request holds (device and swap space). Idempotent."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))
        cpu = self.swapped_blocks.pop(request.request_id, None)
        if cpu:
            self._free_cpu_blocks.extend(cpu)

    # ---- swapping --------------------------------------------------------------------
    def can_swap_out(self, request: Request) -> bool:
        return len(self.req_blocks.get(request.request_id, ())) <= len(self._free_cpu_blocks)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Copy a request's blocks to CPU memory and free them on the device."""
        blocks = self.req_blocks.pop(request.request_id)
        self._num_cached_blocks.pop(request.request_id, None)
        cpu_ids = [self._free_cpu_blocks.pop() for _ in blocks]
        self.swapped_blocks[request.request_id] = cpu_ids
        self.pool.free(list(reversed(blocks)))
        return [(b.block_id, c) for b, c in zip(blocks, cpu_ids, strict=True)]

    def can_swap_in(self, request: Request, num_new_tokens: int) -> bool:
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size)
        return needed <= self.pool.num_free_blocks

    def swap_in(self, request: Request, num_new_tokens: int) -> list[tuple[int, int]]:
        """Bring a swapped request back into fresh device blocks (plus room for the step)."""
        cpu_ids = self.swapped_blocks.pop(request.request_id)
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size)
        blocks = self.pool.allocate(needed)
        self.req_blocks[request.request_id] = blocks
        self._cache_full_blocks(request, blocks, total)
        self._free_cpu_blocks.extend(cpu_ids)
        # (device, cpu) pairs like swap_out's; the runner copies cpu -> device for these.
        return [(b.block_id, c) for c, b in zip(cpu_ids, blocks, strict=False)]
