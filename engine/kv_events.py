"""KV events: what a replica tells the router about its prefix cache.

Each engine step that changed the cache publishes one numbered KVEventBatch. A consumer
that sees a gap in the numbers (or a replica restart, which resets the numbering under a
new `epoch`) asks for a KVSnapshot and rebuilds its view from it.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_hash: int | None  # None: the first stored block is a request's first block


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KVEventBatch:
    epoch: str  # changes when the engine restarts: numbering starts again at 0
    seq: int
    timestamp: float
    events: tuple[KVEvent, ...]


@dataclass(frozen=True)
class KVSnapshot:
    epoch: str
    seq: int  # the last batch number already reflected in `block_hashes`
    block_hashes: frozenset[int]


@dataclass
class KVEventLog:
    """Collects events during a step; `flush()` seals them into a numbered batch.

    Batches are kept in a bounded buffer; a consumer that falls further behind than
    `max_batches` sees a gap and resyncs from a snapshot.
    """

    enabled: bool = True
    max_batches: int = 4096
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex)
    _pending: list[KVEvent] = field(default_factory=list)
    _batches: deque[KVEventBatch] = field(default_factory=deque)
    _next_seq: int = 0

    def record(self, event: KVEvent) -> None:
        if self.enabled:
            self._pending.append(event)

    def flush(self) -> KVEventBatch | None:
        if not self._pending:
            return None
        batch = KVEventBatch(self.epoch, self._next_seq, time.time(), tuple(self._pending))
        self._next_seq += 1
        self._pending = []
        self._batches.append(batch)
        while len(self._batches) > self.max_batches:
            self._batches.popleft()
        return batch

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def take(self, after_seq: int = -1) -> list[KVEventBatch]:
        """Batches numbered above `after_seq` still in the buffer (oldest first)."""
        return [b for b in self._batches if b.seq > after_seq]
