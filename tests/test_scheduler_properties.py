"""Property tests of the KV cache manager and scheduler, without a model.

A simulated model "computes" what the scheduler hands it and samples random tokens.
Random arrivals, aborts and finishes must never leak or double-free a block, the token
budget is never exceeded, and every reference count returns to zero at the end.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rayfleet.engine.config import EngineConfig
from rayfleet.engine.kv_cache_manager import KVCacheManager
from rayfleet.engine.request import Request, RequestStatus
from rayfleet.engine.sampling_params import SamplingParams
from rayfleet.engine.scheduler import Scheduler


def make_request(rid: str, prompt: list[int], max_tokens: int, n_index: int = 0, parent=None):
    return Request(
        request_id=rid,
        parent_id=parent or rid,
        sample_index=n_index,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=frozenset(),
        max_tokens=max_tokens,
    )


def check_invariants(sched: Scheduler, kv: KVCacheManager) -> None:
    refs = Counter()
    for rid, blocks in kv.req_blocks.items():
        ids = [b.block_id for b in blocks]
        assert len(ids) == len(set(ids)), f"{rid} holds a block twice"
        refs.update(ids)
        req = sched.requests[rid]
        assert req.status is RequestStatus.RUNNING, (rid, req.status)
        assert len(blocks) * kv.block_size >= req.num_computed_tokens
    for block in kv.pool.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0), block
        assert block.ref_cnt >= 0
    assert kv.num_free_blocks == sum(1 for b in kv.pool.blocks if b.ref_cnt == 0)
    for h, block in kv.pool._cached.items():
        assert block.block_hash == h
    for req in sched.waiting:
        assert req.request_id not in kv.req_blocks
        assert req.status is RequestStatus.WAITING
    for req in sched.swapped:
        assert req.request_id in kv.swapped_blocks


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    num_blocks = draw(st.integers(8, 64))
    budget = draw(st.integers(1, 64))
    max_seqs = draw(st.integers(1, 8))
    mode = draw(st.sampled_from(["recompute", "swap"]))
    caching = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return block_size, num_blocks, budget, max_seqs, mode, caching, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_arrivals_aborts_finishes_never_leak_blocks(w):
    block_size, num_blocks, budget, max_seqs, mode, caching, seed = w
    rng = random.Random(seed)
    config = EngineConfig(
        block_size=block_size,
        num_kv_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        preemption_mode=mode,
        enable_prefix_caching=caching,
    )
    kv = KVCacheManager(
        num_blocks, block_size, enable_caching=caching, num_cpu_blocks=num_blocks * 2
    )
    sched = Scheduler(config, kv)
    capacity = num_blocks * block_size
    shared_prefix = [rng.randrange(50) for _ in range(3 * block_size)]
    next_id = 0
    for _ in range(120):
        # arrivals (some share a prefix; some are n=2 siblings)
        for _ in range(rng.choice([0, 0, 1, 2])):
            total = rng.randint(2, max(2, capacity))
            plen = rng.randint(1, total - 1)
            prompt = [rng.randrange(50) for _ in range(plen)]
            if rng.random() < 0.5:
                prompt = (shared_prefix + prompt)[: max(1, plen)]
            max_tokens = max(1, total - len(prompt))
            n = rng.choice([1, 1, 2])
            for i in range(n):
                rid = f"r{next_id}" if n == 1 else f"r{next_id}#{i}"
                sched.add_request(make_request(rid, prompt, max_tokens, i, f"r{next_id}"))
            next_id += 1
        # random aborts, wherever the request is
        if sched.requests and rng.random() < 0.1:
            victim = rng.choice(list(sched.requests.values()))
            sched.finish_request(victim, RequestStatus.FINISHED_ABORTED)
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        assert len(sched.running) <= max_seqs
        seen = set()
        for s in out.scheduled:
            assert s.request.request_id not in seen
            seen.add(s.request.request_id)
            assert s.num_new_tokens >= 1
            assert s.request.num_computed_tokens + s.num_new_tokens <= s.request.num_tokens
            assert len(s.block_ids) * block_size >= s.request.num_computed_tokens + s.num_new_tokens
        check_invariants(sched, kv)
        sched.update_after_step(out)
        for s in out.scheduled:
            req = s.request
            if not s.samples:
                continue
            req.append_output_token(rng.randrange(50))
            if req.num_output_tokens >= req.max_tokens or rng.random() < 0.05:
                sched.finish_request(req, RequestStatus.FINISHED_STOPPED)
        check_invariants(sched, kv)
    for req in list(sched.requests.values()):
        sched.finish_request(req, RequestStatus.FINISHED_ABORTED)
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.num_free_blocks == num_blocks
    assert not kv.req_blocks and not kv.swapped_blocks
    assert len(kv._free_cpu_blocks) == num_blocks * 2


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**31))
def test_every_request_finishes_when_each_fits_alone(block_size, budget, seed):
    """No deadlock or starvation: with a tiny pool and preemption, every request completes."""
    rng = random.Random(seed)
    num_blocks = 12
    config = EngineConfig(
        block_size=block_size,
        num_kv_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=4,
    )
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(config, kv)
    capacity = num_blocks * block_size
    reqs = []
    for i in range(10):
        total = rng.randint(2, capacity)
        plen = rng.randint(1, total - 1)
        r = make_request(f"r{i}", [rng.randrange(9) for _ in range(plen)], total - plen)
        reqs.append(r)
        sched.add_request(r)
    for _ in range(20000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert not out.is_empty, "scheduler stalled with unfinished requests"
        sched.update_after_step(out)
        for s in out.scheduled:
            if s.samples:
                s.request.append_output_token(1)
                if s.request.num_output_tokens >= s.request.max_tokens:
                    sched.finish_request(s.request, RequestStatus.FINISHED_LENGTH)
    assert not sched.has_unfinished()
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert kv.num_free_blocks == num_blocks


def test_prefix_hit_reuses_blocks_and_counts_hits():
    kv = KVCacheManager(16, 4)
    a = make_request("a", list(range(10)), 4)
    blocks, n = kv.get_computed_blocks(a)
    assert (blocks, n) == ([], 0)
    ids_a = kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    b = make_request("b", list(range(9)) + [99], 4)
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in blocks] == ids_a[:2]
    ids_b = kv.allocate_slots(b, 2, blocks)
    assert ids_b[:2] == ids_a[:2] and ids_b[2] != ids_a[2]
    assert kv.pool.blocks[ids_a[0]].ref_cnt == 2
    assert kv.stats.hits == 8 and kv.stats.queries == 20


def test_full_prompt_hit_still_computes_the_last_token():
    kv = KVCacheManager(16, 4)
    a = make_request("a", list(range(8)), 4)
    kv.allocate_slots(a, 8)
    kv.free(a)
    b = make_request("b", list(range(8)), 4)
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4 and len(blocks) == 1  # the second block holds the last token: recomputed


def test_eviction_is_lru_and_emits_events():
    kv = KVCacheManager(4, 2)
    reqs = []
    for i, rid in enumerate(["a", "b"]):
        r = make_request(rid, [i * 10 + 1, i * 10 + 2, i * 10 + 3, i * 10 + 4], 1)
        kv.allocate_slots(r, 4)
        kv.free(r)
        reqs.append(r)
    kv.events.flush()
    stored = [e for b in kv.events.take() for e in b.events]
    assert sum(len(e.block_hashes) for e in stored) == 4
    c = make_request("c", [7, 7, 7], 1)
    kv.allocate_slots(c, 3)  # needs 2 blocks: a was freed first, so a's blocks go
    batch = kv.events.flush()
    removed = [
        h for e in batch.events if type(e).__name__ == "BlockRemoved" for h in e.block_hashes
    ]
    assert sorted(removed) == sorted(reqs[0].block_hashes)
    snap = kv.snapshot()
    # b's two blocks survive, and c's one full block [7, 7] was stored
    assert snap.block_hashes == set(reqs[1].block_hashes) | {c.block_hashes[0]}
    assert snap.seq == batch.seq


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(2, 4)
    a = make_request("a", list(range(12)), 1)
    assert kv.allocate_slots(a, 12) is None
    assert kv.num_free_blocks == 2 and "a" not in kv.req_blocks
