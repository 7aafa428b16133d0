"""PrefixIndex / ApproximatePrefixIndex: which replica caches which leading prompt blocks."""

from __future__ import annotations

import random

import pytest
from rayfleet.cluster.prefix_index import ApproximatePrefixIndex, PrefixIndex
from rayfleet.engine import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVSnapshot,
    hash_prompt_blocks,
)
from rayfleet.engine.block_pool import BlockPool
from rayfleet.engine.kv_events import KVEventLog

BS = 4


def chain(tokens: list[int]) -> list[int]:
    return hash_prompt_blocks(tokens, BS)


def stored(*hashes: int) -> BlockStored:
    return BlockStored(tuple(hashes), None)


def batch(seq: int, *events, epoch: str = "e1") -> KVEventBatch:
    return KVEventBatch(epoch, seq, 0.0, tuple(events))


def synced(*replicas: str, epoch: str = "e1") -> PrefixIndex:
    index = PrefixIndex()
    for r in replicas:
        index.resync(r, KVSnapshot(epoch, -1, frozenset()))
    return index


PROMPT = chain(list(range(16)))  # 4 blocks


def test_match_counts_each_replicas_leading_run_of_the_prompt():
    index = synced("a", "b", "c")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    index.apply_batch("b", batch(0, stored(*PROMPT[:2])))
    index.apply_batch("c", batch(0, stored(PROMPT[0], PROMPT[2], PROMPT[3])))  # hole at 1
    assert index.match(["a", "b", "c"], PROMPT) == {"a": 4, "b": 2, "c": 1}


def test_match_gives_zero_to_replicas_it_does_not_know_and_to_an_empty_prompt():
    index = synced("a")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    assert index.match(["a", "ghost"], PROMPT) == {"a": 4, "ghost": 0}
    assert index.match(["a"], []) == {"a": 0}


def test_match_only_considers_the_replicas_asked_about():
    index = synced("a", "b")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    index.apply_batch("b", batch(0, stored(*PROMPT)))
    assert index.match(["b"], PROMPT) == {"b": 4}
    assert index.match(None, PROMPT) == {"a": 4, "b": 4}


def test_removed_blocks_stop_matching():
    index = synced("a")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    assert index.apply_batch("a", batch(1, BlockRemoved((PROMPT[2],)))) is False
    assert index.match(["a"], PROMPT) == {"a": 2}
    assert index.num_blocks("a") == 3


def test_a_replica_never_synced_asks_for_a_snapshot():
    index = PrefixIndex()
    assert index.apply_batch("a", batch(0, stored(*PROMPT))) is True
    assert index.match(["a"], PROMPT) == {"a": 0}
    index.resync("a", KVSnapshot("e1", 0, frozenset(PROMPT)))
    assert index.match(["a"], PROMPT) == {"a": 4}
    assert index.apply_batch("a", batch(1, BlockRemoved((PROMPT[0],)))) is False
    assert index.match(["a"], PROMPT) == {"a": 0}


def test_a_gap_in_the_numbering_asks_for_a_snapshot_and_applies_nothing():
    index = synced("a")
    index.apply_batch("a", batch(0, stored(PROMPT[0])))
    assert index.apply_batch("a", batch(2, stored(PROMPT[1]))) is True
    assert index.match(["a"], PROMPT) == {"a": 1}
    # Until the snapshot arrives, later batches are not applied either.
    assert index.apply_batch("a", batch(3, stored(PROMPT[2]))) is True
    assert index.needs_resync("a")
    index.resync("a", KVSnapshot("e1", 3, frozenset(PROMPT[:3])))
    assert not index.needs_resync("a")
    assert index.last_seq("a") == 3
    assert index.apply_batch("a", batch(4, stored(PROMPT[3]))) is False
    assert index.match(["a"], PROMPT) == {"a": 4}


def test_a_batch_already_reflected_is_ignored():
    index = synced("a")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    index.apply_batch("a", batch(1, BlockRemoved((PROMPT[3],))))
    assert index.apply_batch("a", batch(0, stored(*PROMPT))) is False
    assert index.match(["a"], PROMPT) == {"a": 3}


def test_a_restarted_replica_leaves_the_index_at_once_and_asks_for_a_snapshot():
    index = synced("a", "b")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    index.apply_batch("b", batch(0, stored(*PROMPT)))
    assert index.apply_batch("a", batch(0, stored(PROMPT[0]), epoch="e2")) is True
    assert index.match(["a", "b"], PROMPT) == {"a": 0, "b": 4}
    index.resync("a", KVSnapshot("e2", 0, frozenset(PROMPT[:1])))
    assert index.match(["a", "b"], PROMPT) == {"a": 1, "b": 4}


def test_all_blocks_cleared_empties_only_that_replica():
    index = synced("a", "b")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    index.apply_batch("b", batch(0, stored(*PROMPT)))
    index.apply_batch("a", batch(1, AllBlocksCleared()))
    assert index.match(["a", "b"], PROMPT) == {"a": 0, "b": 4}


def test_resync_replaces_the_replicas_view():
    index = synced("a")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    other = chain(list(range(100, 108)))
    index.resync("a", KVSnapshot("e1", 5, frozenset(other)))
    assert index.match(["a"], PROMPT) == {"a": 0}
    assert index.match(["a"], other) == {"a": 2}
    assert index.num_hashes == 2


def test_a_removed_replica_leaves_at_once_and_its_slot_reuse_leaks_nothing():
    index = synced("a", "b")
    index.apply_batch("a", batch(0, stored(*PROMPT)))
    index.apply_batch("b", batch(0, stored(*PROMPT[:1])))
    index.remove_replica("a")
    assert index.match(["a", "b"], PROMPT) == {"a": 0, "b": 1}
    assert index.replicas_holding(PROMPT[3]) == []
    index.resync("c", KVSnapshot("x", -1, frozenset()))  # takes a's old slot
    assert index.match(["b", "c"], PROMPT) == {"b": 1, "c": 0}
    index.remove_replica("a")  # idempotent


def test_unknown_events_are_a_value_error():
    index = synced("a")
    with pytest.raises(ValueError, match="unknown KV event"):
        index.apply_batch("a", batch(0, "not an event"))


def test_the_index_mirrors_the_engines_block_pool_under_random_traffic():
    """Fed the engine's own events, the index holds exactly the pool's cached hashes."""
    rng = random.Random(0)
    pools = {}
    for name in ("a", "b", "c"):
        log = KVEventLog()
        pools[name] = (BlockPool(24, True, log), log)
    index = PrefixIndex()
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(5)]
    held = {name: [] for name in pools}
    for _ in range(300):
        name = rng.choice(list(pools))
        pool, log = pools[name]
        if held[name] and rng.random() < 0.45:
            pool.free(list(reversed(held[name].pop(rng.randrange(len(held[name]))))))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(9))]
            hashes = chain(tokens)
            if len(hashes) <= pool.num_free_blocks and hashes:
                blocks = pool.allocate(len(hashes))
                pool.cache(blocks, hashes, None)
                held[name].append(blocks)
        b = log.flush()
        if b is not None and index.apply_batch(name, b):
            log.flush()
            index.resync(name, KVSnapshot(log.epoch, log.last_seq, pool.cached_hashes()))
        for n, (p, _) in pools.items():
            if not index.needs_resync(n):
                for h in p.cached_hashes():
                    assert n in index.replicas_holding(h)
                assert index.num_blocks(n) == p.num_cached_blocks


# ---- approximate index -----------------------------------------------------------------
def test_approximate_index_remembers_the_routers_placements():
    index = ApproximatePrefixIndex(max_blocks_per_replica=100)
    index.record("a", PROMPT)
    index.record("b", PROMPT[:2])
    assert index.match(["a", "b", "c"], PROMPT) == {"a": 4, "b": 2, "c": 0}


def test_approximate_index_forgets_the_least_recently_placed_first_tail_before_head():
    index = ApproximatePrefixIndex(max_blocks_per_replica=6)
    first = chain(list(range(16)))  # 4 blocks
    second = chain(list(range(50, 66)))  # 4 blocks
    index.record("a", first)
    index.record("a", second)  # 8 > 6: first's two tail blocks go
    assert index.match(["a"], first) == {"a": 2}
    assert index.match(["a"], second) == {"a": 4}
    index.record("a", first)  # placed again: now the most recent
    assert index.match(["a"], first) == {"a": 4}
    assert index.match(["a"], second) == {"a": 2}
    assert index.num_blocks("a") == 6


def test_approximate_index_ages_placements_out_after_ttl():
    now = [0.0]
    index = ApproximatePrefixIndex(max_blocks_per_replica=100, ttl_s=10.0, clock=lambda: now[0])
    index.record("a", PROMPT)
    now[0] = 5.0
    index.record("b", PROMPT)
    now[0] = 12.0
    assert index.match(["a", "b"], PROMPT) == {"a": 0, "b": 4}


def test_approximate_index_drops_a_removed_replica():
    index = ApproximatePrefixIndex()
    index.record("a", PROMPT)
    index.remove_replica("a")
    assert index.match(["a"], PROMPT) == {"a": 0}
    assert index.num_hashes == 0


def test_approximate_index_rejects_a_bad_size():
    with pytest.raises(ValueError, match="max_blocks_per_replica"):
        ApproximatePrefixIndex(max_blocks_per_replica=0)
