"""Micro-benchmark: one kv-aware placement decision with 64 replicas and 1M indexed blocks.

Builds a `PrefixIndex` through its real entry point (`apply_batch` of BlockStored events):
`--chains` prefix chains of `--chain-blocks` blocks (default 4096 x 256 = 1,048,576 distinct
block hashes), each cached whole on one replica and to a random depth on 0 to 3 more. Then
times `KVAwarePolicy.choose`, built by the router's `build_policy` (lookup in the index and in the
overlay of the last `--pending` placements, cost of every replica, load bound, tie-break) for
prompts of `--prompt-blocks` blocks: half of them follow an indexed chain (and walk the
index to its full depth), half are cold. Also reports `PrefixIndex.match` alone, event
ingestion and snapshot resync. Block hashes are random 128-bit ints, as xxh3-128 digests
are; hashing the prompt is the ingress's job and is timed apart (`hash_prompt_blocks`).

    python -m rayfleet.loadtests.bench_router_decision            # ~30 s on one core

Prints a table, writes loadtests/results/bench_router_decision.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import sys
import time

from rayfleet.cluster.prefix_index import PrefixIndex
from rayfleet.cluster.router_config import RouterConfig
from rayfleet.cluster.routing_policy import KVAwarePolicy, ReplicaLoad, build_policy
from rayfleet.engine import BlockStored, KVEventBatch, KVSnapshot, hash_prompt_blocks
from rayfleet.loadtests.report import save_result


def _pcts(ns: list[int]) -> dict[str, float]:
    xs = sorted(ns)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] / 1000.0

    return {
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": xs[-1] / 1000.0,
        "mean_us": sum(xs) / len(xs) / 1000.0,
    }


def build_index(
    num_replicas: int, chains: int, chain_blocks: int, rng: random.Random
) -> tuple[PrefixIndex, list[list[int]], dict]:
    index = PrefixIndex()
    for r in range(num_replicas):
        index.resync(r, KVSnapshot("e", -1, frozenset()))
    seqs = [-1] * num_replicas
    all_chains = []
    events = 0
    t0 = time.perf_counter()
    for _ in range(chains):
        chain = [rng.getrandbits(128) for _ in range(chain_blocks)]
        all_chains.append(chain)
        holders = rng.sample(range(num_replicas), rng.randint(1, 4))
        for k, r in enumerate(holders):
            # The first holder caches the whole chain, the others a leading part of it.
            depth = chain_blocks if k == 0 else rng.randint(chain_blocks // 4, chain_blocks)
            seqs[r] += 1
            # One engine step's worth of stored blocks per batch (64 blocks = 1024 tokens).
            for start in range(0, depth, 64):
                batch = KVEventBatch(
                    "e", seqs[r], 0.0, (BlockStored(tuple(chain[start : start + 64]), None),)
                )
                if start:
                    seqs[r] += 1
                    batch = KVEventBatch("e", seqs[r], 0.0, batch.events)
                if index.apply_batch(r, batch):
                    raise RuntimeError("unexpected resync while building")
                events += len(batch.events[0].block_hashes)
    build_s = time.perf_counter() - t0
    per_replica = [index.num_blocks(r) for r in range(num_replicas)]
    info = {
        "distinct_block_hashes": index.num_hashes,
        "replica_block_entries": sum(per_replica),
        "blocks_per_replica_mean": sum(per_replica) / num_replicas,
        "ingest_blocks_per_s": events / build_s,
        "build_s": build_s,
    }
    return index, all_chains, info


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index, chains, info = build_index(args.replicas, args.chains, args.chain_blocks, rng)
    info["index_rss_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    loads = [
        ReplicaLoad(
            replica_id=r,
            num_running=rng.randint(0, 100),
            num_waiting=rng.randint(0, 10),
            num_free_blocks=rng.randint(2000, 50000),
            num_total_blocks=50000,
            max_num_seqs=256,
            queued_prefill_tokens=rng.randint(0, 8000),
            block_size=16,
            inflight=rng.randint(0, 4),
        )
        for r in range(args.replicas)
    ]
    # The production factory: exact index plus the overlay of pending placements, which
    # holds the last --pending prompts placed (a frozen clock: none expires mid-run).
    policy = build_policy(RouterConfig(seed=args.seed), index=index, clock=lambda: 0.0)
    assert isinstance(policy, KVAwarePolicy) and policy.pending is not None
    pb = args.prompt_blocks
    prompts = []
    for i in range(1024):
        if i % 2 == 0:  # follows an indexed chain, then 8 blocks of its own
            chain = rng.choice(chains)
            prompts.append(chain[: pb - 8] + [rng.getrandbits(128) for _ in range(8)])
        else:
            prompts.append([rng.getrandbits(128) for _ in range(pb)])
    num_tokens = pb * 16 + 7
    for i in range(args.pending):
        policy.on_placed(rng.randrange(args.replicas), prompts[(2 * i) % len(prompts)])
    ids = list(range(args.replicas))

    gc_runs = [0, 0, 0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_runs[info["generation"]] += 1

    def timed(fn) -> tuple[list[int], list[int]]:
        """Wall-clock and thread CPU time of each call (CPU time leaves out the time this
        process was descheduled: on a shared machine that is most of the wall-clock tail)."""
        for p in prompts[:200]:  # warm up
            fn(p)
        wall, cpu = [], []
        clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
        for i in range(args.iterations):
            p = prompts[i % len(prompts)]
            c = cpu_clock()
            t = clock()
            fn(p)
            wall.append(clock() - t)
            cpu.append(cpu_clock() - c)
        return wall, cpu

    gc.collect()
    gc.callbacks.append(on_gc)
    decide_wall, decide_cpu = timed(lambda p: policy.choose(loads, p, num_tokens))
    gc.callbacks.remove(on_gc)
    match_wall, match_cpu = timed(lambda p: index.match(ids, p))
    decide, match = _pcts(decide_wall), _pcts(match_wall)
    decide_cpu_p, match_cpu_p = _pcts(decide_cpu), _pcts(match_cpu)
    hits = sum(1 for p in prompts[::2] if policy.choose(loads, p, num_tokens).cached_blocks > 0)

    # Resync of one replica from a snapshot of its blocks (plus 10% changed).
    mine = {h for h, m in index._masks.items() if m & 1}
    changed = set(list(mine)[: len(mine) // 10 * 9]) | {
        rng.getrandbits(128) for _ in range(len(mine) // 10)
    }
    t = time.perf_counter()
    index.resync(0, KVSnapshot("e2", 0, frozenset(changed)))
    resync_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    index.remove_replica(1)
    remove_ms = (time.perf_counter() - t) * 1000

    tokens = [rng.randrange(32000) for _ in range(num_tokens)]
    t = time.perf_counter()
    for _ in range(50):
        hash_prompt_blocks(tokens, 16)
    hash_us = (time.perf_counter() - t) / 50 * 1e6
    return {
        "replicas": args.replicas,
        "prompt_blocks": pb,
        "pending_placements": args.pending,
        "pending_blocks": policy.pending.num_hashes,
        "prompt_tokens": num_tokens,
        "iterations": args.iterations,
        "index": info,
        "decision": decide,
        "decision_cpu": decide_cpu_p,
        "match_only": match,
        "match_only_cpu": match_cpu_p,
        "gc_collections_during_decisions": {
            "gen0": gc_runs[0],
            "gen1": gc_runs[1],
            "gen2": gc_runs[2],
        },
        "load_average": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "warm_prompts_with_a_hit": hits / len(prompts[::2]),
        "resync_one_replica_ms": resync_ms,
        "resync_blocks": len(changed),
        "remove_replica_ms": remove_ms,
        "hash_prompt_blocks_us": hash_us,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--chains", type=int, default=4096)
    p.add_argument("--chain-blocks", type=int, default=256)
    p.add_argument("--prompt-blocks", type=int, default=128, help="128 x 16 = 2048 tokens")
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument(
        "--pending", type=int, default=256, help="recent placements in the pending overlay"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="loadtests/results")
    p.add_argument("--output", default="bench_router_decision.json")
    args = p.parse_args(argv)
    res = run(args)
    ix = res["index"]
    print(
        f"index: {args.replicas} replicas, {ix['distinct_block_hashes']:,} distinct blocks "
        f"({ix['replica_block_entries']:,} replica-block entries, "
        f"{ix['index_rss_mib']:.0f} MiB), ingest {ix['ingest_blocks_per_s'] / 1e6:.2f} M blocks/s"
    )
    print(
        f"prompt: {res['prompt_blocks']} blocks ({res['prompt_tokens']} tokens); "
        f"load average {res['load_average'][0]:.1f} on {res['cpu_count']} CPUs; "
        f"GC during decisions: {res['gc_collections_during_decisions']}"
    )
    print(f"{'':<34}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}  (us)")
    rows = (
        ("decision", "KVAwarePolicy.choose, wall"),
        ("decision_cpu", "KVAwarePolicy.choose, CPU"),
        ("match_only", "PrefixIndex.match, wall"),
        ("match_only_cpu", "PrefixIndex.match, CPU"),
    )
    for key, label in rows:
        d = res[key]
        print(
            f"{label:<34}{d['p50_us']:>9.1f}{d['p90_us']:>9.1f}{d['p99_us']:>9.1f}"
            f"{d['p999_us']:>9.1f}{d['max_us']:>9.1f}"
        )
    print(
        f"resync one replica ({res['resync_blocks']:,} blocks): {res['resync_one_replica_ms']:.1f} ms; "
        f"remove a replica: {res['remove_replica_ms']:.1f} ms; "
        f"hash_prompt_blocks ({res['prompt_tokens']} tokens, ingress): "
        f"{res['hash_prompt_blocks_us']:.0f} us"
    )
    print(f"wrote {save_result(args.result_dir, args.output, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
