"""PrefixIndex: which replica caches which prompt blocks, for the router.

One dict maps each chained block hash (`rayfleet.engine.hash_prompt_blocks`) to a bitmask of
the replicas caching it (one bit per replica slot). `match` walks a prompt's hashes in
order, AND-ing the masks into the set of candidates still matching, and stops as soon as
none is left: a lookup costs one dict probe per leading block that some candidate still
holds, whatever the number of replicas or indexed blocks.

Two ways to fill it:
- `PrefixIndex`: exact, fed by each engine's numbered KV events. A gap in the numbering or a
  new epoch (the engine restarted) makes `apply_batch` return True: the caller fetches a
  `KVSnapshot` and calls `resync`. A replica that dies or is removed leaves at once
  (`remove_replica`).
- `ApproximatePrefixIndex`: when KV events are off, it remembers the router's own
  placements (`record`), at most `max_blocks_per_replica` per replica, least recently
  placed forgotten first, and optionally after `ttl_s`.

Neither imports ray; neither is thread-safe (the router calls it from one event loop).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from rayfleet.engine import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVSnapshot,
)

ReplicaId = Hashable


class _BitsetIndex:
    """hash -> bitmask of replica slots, plus each replica's own set for removal."""

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}
        self._slot: dict[ReplicaId, int] = {}
        self._ids: dict[int, ReplicaId] = {}  # slot -> replica id
        self._free_slots: list[int] = []  # reused, lowest first, to keep masks small

    # ---- replicas --------------------------------------------------------------------
    def _slot_of(self, replica_id: ReplicaId) -> int:
        slot = self._slot.get(replica_id)
        if slot is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            else:
                slot = len(self._slot)
            self._slot[replica_id] = slot
            self._ids[slot] = replica_id
        return slot

    def _drop_slot(self, replica_id: ReplicaId) -> int | None:
        slot = self._slot.pop(replica_id, None)
        if slot is not None:
            del self._ids[slot]
            heapq.heappush(self._free_slots, slot)
        return slot

    def _add(self, slot: int, block_hash: int) -> None:
        self._masks[block_hash] = self._masks.get(block_hash, 0) | (1 << slot)

    def _discard(self, slot: int, block_hash: int) -> None:
        mask = self._masks.get(block_hash, 0) & ~(1 << slot)
        if mask:
            self._masks[block_hash] = mask
        else:
            self._masks.pop(block_hash, None)

    def _discard_all(self, slot: int, block_hashes: Iterable[int]) -> None:
        """`_discard` for many hashes, each known to be indexed for this slot."""
        masks = self._masks
        keep = ~(1 << slot)
        for h in block_hashes:
            mask = masks[h] & keep
            if mask:
                masks[h] = mask
            else:
                del masks[h]

    # ---- queries ---------------------------------------------------------------------
    @property
    def replica_ids(self) -> list[ReplicaId]:
        return list(self._slot)

    @property
    def num_hashes(self) -> int:
        """Distinct block hashes indexed (a hash cached on several replicas counts once)."""
        return len(self._masks)

    def replicas_holding(self, block_hash: int) -> list[ReplicaId]:
        return self._ids_in(self._masks.get(block_hash, 0))

    def _ids_in(self, mask: int) -> list[ReplicaId]:
        ids = self._ids
        out = []
        while mask:
            low = mask & -mask
            out.append(ids[low.bit_length() - 1])
            mask ^= low
        return out

    def match(
        self, replica_ids: Iterable[ReplicaId] | None, block_hashes: Sequence[int]
    ) -> dict[ReplicaId, int]:
        """Per replica, how many of the prompt's *leading* blocks it caches (0 if unknown).

        `replica_ids=None` means every replica in the index.
        """
        slot_of = self._slot
        if replica_ids is None:
            out = dict.fromkeys(slot_of, 0)
            alive = 0
            for slot in slot_of.values():
                alive |= 1 << slot
        else:
            out = {}
            alive = 0
            for rid in replica_ids:
                out[rid] = 0
                slot = slot_of.get(rid)
                if slot is not None:
                    alive |= 1 << slot
        if not alive:
            return out
        masks = self._masks
        ids = self._ids
        depth = 0
        for block_hash in block_hashes:
            still = masks.get(block_hash, 0) & alive
            if still != alive:
                gone = alive & ~still
                while gone:  # these matched exactly `depth` leading blocks
                    low = gone & -gone
                    out[ids[low.bit_length() - 1]] = depth
                    gone ^= low
                alive = still
                if not alive:
                    return out
            depth += 1
        while alive:  # matched the whole prompt
            low = alive & -alive
            out[ids[low.bit_length() - 1]] = depth
            alive ^= low
        return out


@dataclass
class _ReplicaState:
    blocks: set[int]
    epoch: str | None = None
    seq: int = -1  # last batch reflected
    needs_resync: bool = True


class PrefixIndex(_BitsetIndex):
    """Exact prefix index fed by the replicas' KV events."""

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[ReplicaId, _ReplicaState] = {}

    # ---- feeding ---------------------------------------------------------------------
    def add_replica(self, replica_id: ReplicaId) -> None:
        """Make a replica known (empty, awaiting its first snapshot). Idempotent."""
        if replica_id not in self._state:
            self._slot_of(replica_id)
            self._state[replica_id] = _ReplicaState(set())

    def apply_batch(self, replica_id: ReplicaId, batch: KVEventBatch) -> bool:
        """Apply one numbered batch of a replica's KV events; True: resync from a snapshot.

        True (nothing applied) for a replica never synced, a gap in the numbering or a new
        epoch. A new epoch means the engine restarted: its old blocks are gone, so they
        leave the index now. A batch already reflected (seq <= last) is ignored.
        """
        state = self._state.get(replica_id)
        if state is None:
            self.add_replica(replica_id)
            return True
        if state.epoch != batch.epoch:
            if state.epoch is not None:
                self._clear(replica_id, state)
                state.epoch = None
                state.seq = -1
            state.needs_resync = True
            return True
        if batch.seq <= state.seq:
            return False
        if batch.seq != state.seq + 1 or state.needs_resync:
            state.needs_resync = True
            return True
        slot = self._slot[replica_id]
        blocks = state.blocks
        for event in batch.events:
            if isinstance(event, BlockStored):
                bit = 1 << slot
                masks = self._masks
                for h in event.block_hashes:
                    if h not in blocks:
                        blocks.add(h)
                        masks[h] = masks.get(h, 0) | bit
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    if h in blocks:
                        blocks.discard(h)
                        self._discard(slot, h)
            elif isinstance(event, AllBlocksCleared):
                self._clear(replica_id, state)
            else:
                raise ValueError(f"unknown KV event {event!r} from replica {replica_id!r}")
        state.seq = batch.seq
        return False

    def resync(self, replica_id: ReplicaId, snapshot: KVSnapshot) -> None:
        """Replace a replica's view with a snapshot; events numbered above it apply next."""
        self.add_replica(replica_id)
        state = self._state[replica_id]
        slot = self._slot[replica_id]
        new = set(snapshot.block_hashes)
        self._discard_all(slot, state.blocks - new)
        masks = self._masks
        bit = 1 << slot
        for h in new - state.blocks:
            masks[h] = masks.get(h, 0) | bit
        state.blocks = new
        state.epoch = snapshot.epoch
        state.seq = snapshot.seq
        state.needs_resync = False

    def remove_replica(self, replica_id: ReplicaId) -> None:
        """Forget a replica (it died or was scaled down). Idempotent."""
        state = self._state.pop(replica_id, None)
        if state is not None:
            self._clear(replica_id, state)
            self._drop_slot(replica_id)

    def _clear(self, replica_id: ReplicaId, state: _ReplicaState) -> None:
        self._discard_all(self._slot[replica_id], state.blocks)
        state.blocks = set()

    # ---- queries ---------------------------------------------------------------------
    def needs_resync(self, replica_id: ReplicaId) -> bool:
        state = self._state.get(replica_id)
        return state is None or state.needs_resync

    def last_seq(self, replica_id: ReplicaId) -> int:
        """The last batch number reflected for a replica (-1: none): poll events after it."""
        state = self._state.get(replica_id)
        return -1 if state is None else state.seq

    def num_blocks(self, replica_id: ReplicaId) -> int:
        state = self._state.get(replica_id)
        return 0 if state is None else len(state.blocks)

    def blocks(self, replica_id: ReplicaId) -> frozenset[int]:
        """The block hashes indexed for a replica (to compare with its engine's cache)."""
        state = self._state.get(replica_id)
        return frozenset() if state is None else frozenset(state.blocks)


class ApproximatePrefixIndex(_BitsetIndex):
    """Prefix index guessed from the router's own placements (KV events off).

    A placed prompt's blocks are assumed cached on the replica that got it. Each replica
    remembers at most `max_blocks_per_replica` blocks (set it near the replica's KV pool
    size): the least recently placed go first, and within one prompt the tail goes before
    the head, as the engine evicts. With `ttl_s`, a block not placed again for that long is
    forgotten too.
    """

    def __init__(
        self,
        max_blocks_per_replica: int = 16384,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if max_blocks_per_replica < 1:
            raise ValueError(f"max_blocks_per_replica must be >= 1, got {max_blocks_per_replica}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s}")
        self.max_blocks_per_replica = max_blocks_per_replica
        self.ttl_s = ttl_s
        self._clock = clock
        # Per replica: block hash -> time last placed, oldest first.
        self._lru: dict[ReplicaId, OrderedDict[int, float]] = {}
        self._next_sweep = -float("inf")  # `match` sweeps expired entries at most this often

    def record(self, replica_id: ReplicaId, block_hashes: Sequence[int]) -> None:
        """The router placed a prompt with these block hashes on this replica."""
        slot = self._slot_of(replica_id)
        lru = self._lru.setdefault(replica_id, OrderedDict())
        now = self._clock()
        bit = 1 << slot
        masks = self._masks
        # Tail first, so the head ends most recent and is evicted last.
        for h in reversed(block_hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                masks[h] = masks.get(h, 0) | bit
            lru[h] = now
        while len(lru) > self.max_blocks_per_replica:
            h, _ = lru.popitem(last=False)
            self._discard(slot, h)
        self._expire(replica_id, now)

    def expire(self) -> None:
        """Forget placements older than `ttl_s` on every replica. `record` does it for its
        replica, `match` for all at most every ttl_s / 8 (so an entry lives at most
        1.125 x ttl_s, and a lookup stays one walk of the prompt)."""
        now = self._clock()
        for rid in list(self._lru):
            self._expire(rid, now)
        if self.ttl_s is not None:
            self._next_sweep = now + self.ttl_s / 8

    def _expire(self, replica_id: ReplicaId, now: float) -> None:
        if self.ttl_s is None:
            return
        lru = self._lru[replica_id]
        slot = self._slot[replica_id]
        deadline = now - self.ttl_s
        while lru:
            h, t = next(iter(lru.items()))
            if t > deadline:
                break
            lru.popitem(last=False)
            self._discard(slot, h)

    def match(
        self, replica_ids: Iterable[ReplicaId] | None, block_hashes: Sequence[int]
    ) -> dict[ReplicaId, int]:
        if self.ttl_s is not None and self._clock() >= self._next_sweep:
            self.expire()
        return super().match(replica_ids, block_hashes)

    def remove_replica(self, replica_id: ReplicaId) -> None:
        lru = self._lru.pop(replica_id, None)
        if lru is None:
            return
        self._discard_all(self._slot[replica_id], lru)
        self._drop_slot(replica_id)

    def num_blocks(self, replica_id: ReplicaId) -> int:
        lru = self._lru.get(replica_id)
        return 0 if lru is None else len(lru)
