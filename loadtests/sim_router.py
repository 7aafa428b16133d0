"""Discrete-event simulation of the global router over N simulated replicas (2 ... 256).

The router side is the production code unchanged: `rayfleet.cluster.routing_policy`'s
policies and `AdmissionQueue`, and `rayfleet.cluster.prefix_index.PrefixIndex` fed by the
replicas' numbered KV events. Each replica models one engine: the engine's own `BlockPool`
(reference-counted blocks, prefix cache by chained block hash, LRU eviction of cached free
blocks, KV events), and a scheduler following `engine/scheduler.py`'s rule (running
requests first, then waiting ones FIFO, chunked under a token budget, newest preempted when
blocks run out). A step takes

    step_ms = decode_step_ms + decode_ms_per_seq x sequences in the step
            + prefill_ms_per_token x prompt tokens prefilled in the step

Presets (override any constant with its flag):
- `cpu`: ~the rayfleet CPU engine on the default SmolLM2-135M (float32): prefill 0.4 ms per
  token, decode step 40 ms + 1 ms per sequence, 128 sequences, 2048-token budget, blocks of
  16 tokens; 2048 KV blocks per replica (the engine's default pool is larger; a smaller one
  gives these modest workloads the cache pressure long production prompts create).
- `gpu`: ~an 8B model in bfloat16 on one H100: prefill 0.06 ms/token, decode step 8 ms +
  0.08 ms per sequence, 256 sequences, 8192-token budget, 8192 blocks.

Workloads (token ids are synthetic; the hashes are the engine's `hash_prompt_blocks`):
- `shared-prefix`: G = groups-per-replica x N groups of P prompts; each group shares a
  prefix of --prefix-len tokens, each prompt adds --suffix-len tokens of its own.
- `random`: unrelated prompts of prefix-len + suffix-len tokens.
- `skewed`: --hot-share (80%) of prompts share one prefix (a dominant system prompt), the
  rest are unrelated.
Arrivals are Poisson at --rate-per-replica x N requests/s.

The "oracle" hit rate is what the same total cache could do with infinite compute: every
request sees one pooled LRU cache of N x blocks-per-replica blocks (no copies of a prefix).

    python -m rayfleet.loadtests.sim_router        # 3 workloads x 2..256 replicas, ~1-2 min
    python -m rayfleet.loadtests.sim_router --workload skewed --replicas 8 32 128

Prints a table per workload, writes loadtests/results/sim_router.json and sim_router.png
(hit rate and TTFT against replica count, one row per workload). Columns: `hit` prefix-cache
hit rate (share of prompt tokens served from cache), `oracle` (above), `spill` placements
where the load bound turned away a replica with a longer match, `imbal` max/mean requests
served per replica, `g0N` replicas that served prefix group 0 (skewed: the hot prefix).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rayfleet.cluster.config import key_value
from rayfleet.cluster.prefix_index import PrefixIndex
from rayfleet.cluster.router_config import CostWeights, RouterConfig
from rayfleet.cluster.routing_policy import (
    AdmissionQueue,
    QueueFull,
    ReplicaLoad,
    RoutingPolicy,
    build_policy,
)
from rayfleet.engine.block_hash import ROOT_HASH, hash_prompt_blocks
from rayfleet.engine.block_pool import BlockPool, KVBlock
from rayfleet.engine.kv_events import KVEventLog

POLICIES = (
    "kv-aware",
    "power-of-two",
    "round-robin",
    "kv-aware-approx",
    "kv-aware-unbounded",
    "kv-aware-events-only",
)
WORKLOADS = ("shared-prefix", "random", "skewed")


@dataclass
class CostModel:
    prefill_ms_per_token: float
    decode_step_ms: float
    decode_ms_per_seq: float
    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: int
    block_size: int = 16
    rate_per_replica: float = 1.5  # requests/s per replica the preset's sweep uses

    def step_s(self, num_seqs: int, prefill_tokens: int) -> float:
        return (
            self.decode_step_ms
            + self.decode_ms_per_seq * num_seqs
            + self.prefill_ms_per_token * prefill_tokens
        ) / 1000.0


PRESETS = {
    "cpu": CostModel(0.4, 40.0, 1.0, 128, 2048, 2048, 16, 1.5),
    "gpu": CostModel(0.06, 8.0, 0.08, 256, 8192, 8192, 16, 12.0),
}


# ---- workload --------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class SimRequest:
    rid: int
    arrival: float
    prompt_len: int
    output_len: int
    hashes: list[int]
    group: int  # prefix group (-1: none)
    # replica-side state
    replica: int = -1
    target: int = 0  # tokens whose KV the current (re)prefill computes
    num_computed: int = 0
    generated: int = 0
    blocks: list[KVBlock] = field(default_factory=list)
    num_registered: int = 0  # leading prompt blocks registered in the prefix cache
    hit_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    first_token: float = -1.0
    finish: float = -1.0


def make_workload(
    kind: str,
    num_replicas: int,
    *,
    prompts_per_replica: int,
    groups_per_replica: float,
    prompts_per_group: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    hot_share: float,
    rate: float,
    block_size: int,
    seed: int,
) -> list[SimRequest]:
    """Requests with Poisson arrivals at `rate` x N per second (shuffled across groups)."""
    rng = random.Random(seed)
    vocab = 32000

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def hashes_after(prefix_hashes: list[int], prefix_len_: int, suffix: list[int]) -> list[int]:
        # Continue the chain from a shared, already-hashed prefix (prefix_len_ % bs == 0).
        parent = prefix_hashes[-1] if prefix_hashes else ROOT_HASH
        return prefix_hashes + hash_prompt_blocks(suffix, block_size, parent_hash=parent)

    if prefix_len % block_size:
        raise ValueError(f"prefix_len ({prefix_len}) must be a multiple of {block_size}")
    specs: list[tuple[int, list[int]]] = []  # (group, hashes)
    if kind == "shared-prefix":
        num_groups = max(1, round(groups_per_replica * num_replicas))
        for g in range(num_groups):
            ph = hash_prompt_blocks(tokens(prefix_len), block_size)
            for _ in range(prompts_per_group):
                specs.append((g, hashes_after(ph, prefix_len, tokens(suffix_len))))
    elif kind in ("random", "skewed"):
        n = prompts_per_replica * num_replicas
        hot = hash_prompt_blocks(tokens(prefix_len), block_size)
        for _ in range(n):
            if kind == "skewed" and rng.random() < hot_share:
                specs.append((0, hashes_after(hot, prefix_len, tokens(suffix_len))))
            else:
                specs.append((-1, hash_prompt_blocks(tokens(prefix_len + suffix_len), block_size)))
    else:
        raise ValueError(f"unknown workload {kind!r}; one of {WORKLOADS}")
    rng.shuffle(specs)
    t = 0.0
    total_rate = rate * num_replicas
    out = []
    for i, (g, h) in enumerate(specs):
        t += rng.expovariate(total_rate)
        out.append(SimRequest(i, t, prefix_len + suffix_len, output_len, h, g))
    return out


def oracle_hit_rate(requests: list[SimRequest], capacity_blocks: int, block_size: int) -> float:
    """Hit rate of one pooled LRU cache of `capacity_blocks` with infinite compute."""
    cache: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for r in sorted(requests, key=lambda r: r.arrival):
        limit = (r.prompt_len - 1) // block_size
        n = 0
        for h in r.hashes[:limit]:
            if h not in cache:
                break
            n += 1
        hit += n * block_size
        total += r.prompt_len
        for h in reversed(r.hashes):
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hit / total if total else 0.0


# ---- one replica -----------------------------------------------------------------------
class SimReplica:
    """One engine: the real BlockPool and KV events, a model of the scheduler and runner."""

    def __init__(self, idx: int, cm: CostModel) -> None:
        self.idx = idx
        self.cm = cm
        self.events = KVEventLog()
        self.pool = BlockPool(cm.num_blocks, True, self.events)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy = False
        self.load = ReplicaLoad(
            replica_id=idx,
            num_free_blocks=cm.num_blocks,
            num_total_blocks=cm.num_blocks,
            max_num_seqs=cm.max_num_seqs,
            block_size=cm.block_size,
        )
        self.num_preemptions = 0
        self.num_served = 0
        self._out: dict[SimRequest, int] = {}
        self._preempted: set[SimRequest] = set()

    def refresh_load(self) -> None:
        x = self.load
        x.num_running = len(self.running)
        x.num_waiting = len(self.waiting)
        x.num_free_blocks = self.pool.num_free_blocks
        x.queued_prefill_tokens = sum(r.target - r.num_computed for r in self.waiting) + sum(
            r.target - r.num_computed for r in self.running if r.num_computed < r.target
        )

    def add(self, req: SimRequest) -> None:
        req.replica = self.idx
        req.target = req.prompt_len
        self.waiting.append(req)
        self.refresh_load()

    # -- blocks
    def _grow(self, req: SimRequest, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens of KV, preempting the newest others if needed."""
        bs = self.cm.block_size
        need = -(-num_tokens // bs) - len(req.blocks)
        while need > self.pool.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.blocks.extend(self.pool.allocate(need))
        return True

    def _register(self, req: SimRequest, num_tokens: int) -> None:
        full = min(num_tokens, req.prompt_len) // self.cm.block_size
        start = req.num_registered
        if full > start:
            parent = req.hashes[start - 1] if start else None
            self.pool.cache(req.blocks[start:full], req.hashes[start:full], parent)
            req.num_registered = full

    def _free(self, req: SimRequest) -> None:
        if req.blocks:
            self.pool.free(list(reversed(req.blocks)))
        req.blocks = []
        req.num_registered = 0

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self._free(req)
        req.target = req.prompt_len + max(0, req.generated - 1)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        self._preempted.add(req)
        self._out.pop(req, None)

    # -- one step
    def schedule(self) -> tuple[float, dict[SimRequest, int]]:
        """Pick this step's work; returns (duration in seconds, [(request, tokens)])."""
        cm = self.cm
        budget = cm.max_num_batched_tokens
        out = self._out = {}  # request -> tokens this step (a preempted one leaves it)
        self._preempted = set()
        prefill = 0
        for req in list(self.running):
            if budget <= 0:
                break
            if req in self._preempted:  # preempted by an earlier one this step
                continue
            if req.num_computed < req.target:
                n = min(budget, req.target - req.num_computed)
            else:
                n = 1
            if not self._grow(req, req.num_computed + n):
                continue
            self._register(req, req.num_computed + n)
            out[req] = n
            budget -= n
            if req.num_computed < req.target:
                prefill += n
        bs = cm.block_size
        while self.waiting and budget > 0 and len(self.running) < cm.max_num_seqs:
            req = self.waiting[0]
            limit = (req.target - 1) // bs
            hits: list[KVBlock] = []
            for h in req.hashes[: min(limit, len(req.hashes))]:
                b = self.pool.lookup(h)
                if b is None:
                    break
                hits.append(b)
            cached = len(hits) * bs
            n = min(budget, req.target - cached)
            need = -(-(cached + n) // bs) - len(hits)
            revived = sum(1 for b in hits if b.ref_cnt == 0)
            if need > self.pool.num_free_blocks - revived:
                break
            self.waiting.popleft()
            self.pool.touch(hits)
            req.blocks = hits + (self.pool.allocate(need) if need > 0 else [])
            req.num_registered = len(hits)
            req.num_computed = cached
            if req.hit_tokens < 0:
                req.hit_tokens = cached
            self._register(req, cached + n)
            self.running.append(req)
            out[req] = n
            budget -= n
            prefill += n
        dur = cm.step_s(len(out), prefill) if out else 0.0
        return dur, out

    def finish_step(self, now: float, work: dict[SimRequest, int]) -> list[SimRequest]:
        done = []
        for req, n in work.items():
            req.num_computed += n
            if req.num_computed >= req.target:
                req.generated += 1  # prefill complete: a token is sampled; decode: the next
                if req.first_token < 0:
                    req.first_token = now
                if req.generated >= req.output_len:
                    req.finish = now
                    self.running.remove(req)
                    self._free(req)
                    self.num_served += 1
                    done.append(req)
        return done


# ---- the simulation --------------------------------------------------------------------
@dataclass
class SimResult:
    policy: str
    workload: str
    num_replicas: int
    num_requests: int
    hit_rate: float
    oracle_hit_rate: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    e2e_mean_s: float
    makespan_s: float
    throughput_rps: float
    rejected: int
    queue_max_len: int
    queue_wait_p99_s: float
    spilled: int
    preemptions: int
    load_imbalance: float  # max / mean requests served per replica
    hot_prefix_replicas: int  # replicas that served group 0 (the skewed workload's hot prefix)
    hot_prefix_max_share: float  # largest share of group 0 on one replica
    wall_s: float


class SimClock:
    """Simulated time, for the router parts that read a clock (TTLs, queue wait times)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_policy(
    name: str,
    cm: CostModel,
    epsilon: float | None,
    seed: int,
    clock: SimClock,
    weights: CostWeights | None = None,
    slack: int | None = None,
) -> RoutingPolicy:
    """The router's own `build_policy` from a `RouterConfig`, as the Ray router builds it.

    kv-aware-approx: KV events off (the index is the router's placements, as many blocks
    per replica as its pool). kv-aware-unbounded: no load bound. kv-aware-events-only: no
    pending-placement overlay (the index learns a prefix only from the replica's events).
    """
    fields: dict[str, Any] = {"seed": seed, "load_bound_epsilon": epsilon}
    if weights is not None:
        fields["weights"] = weights
    if slack is not None:
        fields["load_bound_slack"] = slack
    if name in ("power-of-two", "round-robin"):
        fields["policy"] = name
    elif name == "kv-aware-approx":
        fields.update(kv_events=False, approx_blocks_per_replica=cm.num_blocks, approx_ttl_s=None)
    elif name == "kv-aware-unbounded":
        fields["load_bound_epsilon"] = None
    elif name == "kv-aware-events-only":
        fields["pending_placement_ttl_s"] = None
    elif name != "kv-aware":
        raise ValueError(f"unknown policy {name!r}; one of {POLICIES}")
    return build_policy(RouterConfig(**fields), clock=clock)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def simulate(
    requests: list[SimRequest],
    num_replicas: int,
    policy: RoutingPolicy,
    cm: CostModel,
    *,
    workload: str = "",
    label: str | None = None,
    clock: SimClock | None = None,
    queue_max_len: int = 1 << 30,
    oracle: float | None = None,
) -> SimResult:
    """Run one policy over one workload; the requests are reset first (reusable).

    `clock` must be the one the policy was built with (TTLs run on simulated time).
    """
    wall0 = time.perf_counter()
    clock = clock or SimClock()
    clock.now = 0.0
    for r in requests:
        r.replica, r.target, r.num_computed, r.generated = -1, 0, 0, 0
        r.blocks, r.num_registered, r.hit_tokens = [], 0, -1
        r.first_token = r.finish = -1.0
    replicas = [SimReplica(i, cm) for i in range(num_replicas)]
    loads = [rep.load for rep in replicas]
    index = getattr(policy, "index", None)
    if isinstance(index, PrefixIndex):
        for rep in replicas:  # first contact: an (empty) snapshot, as the router does
            index.resync(rep.idx, _snap(rep))
    now = 0.0
    queue: AdmissionQueue[SimRequest] = AdmissionQueue(max_len=queue_max_len, clock=clock)
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    for r in requests:
        heap.append((r.arrival, seq, 0, r))
        seq += 1
    heapq.heapify(heap)
    pending: dict[int, dict[SimRequest, int]] = {}
    spilled = 0
    rejected = 0
    queue_max = 0

    def start_step(rep: SimReplica) -> None:
        nonlocal seq
        dur, work = rep.schedule()
        if not work:
            rep.busy = False
            return
        rep.busy = True
        pending[rep.idx] = work
        rep.refresh_load()
        heapq.heappush(heap, (now + dur, seq, 1, rep))
        seq += 1

    def try_bind(req: SimRequest) -> bool:
        nonlocal spilled
        placement = policy.choose(loads, req.hashes, req.prompt_len)
        if placement is None:
            return False
        spilled += placement.spilled
        policy.on_placed(placement.replica_id, req.hashes)
        rep = replicas[placement.replica_id]
        rep.add(req)
        if not rep.busy:
            start_step(rep)
        return True

    while heap:
        now, _, kind, obj = heapq.heappop(heap)
        clock.now = now
        if kind == 0:
            if len(queue) == 0 and try_bind(obj):
                queue.record_fast_path()
            else:
                try:
                    queue.push(obj)
                    queue_max = max(queue_max, len(queue))
                except QueueFull:
                    rejected += 1
            continue
        rep: SimReplica = obj
        rep.finish_step(now, pending.pop(rep.idx))
        batch = rep.events.flush()
        if batch is not None and isinstance(index, PrefixIndex):
            if index.apply_batch(rep.idx, batch):
                index.resync(rep.idx, _snap(rep))
        rep.refresh_load()
        start_step(rep)
        if len(queue):
            queue.drain(try_bind)

    served = [r for r in requests if r.finish >= 0]
    ttft = [r.first_token - r.arrival for r in served]
    prompt_tokens = sum(r.prompt_len for r in served)
    hits = sum(max(0, r.hit_tokens) for r in served)
    per_rep = [rep.num_served for rep in replicas]
    hot = [r.replica for r in served if r.group == 0]
    hot_counts: dict[int, int] = {}
    for x in hot:
        hot_counts[x] = hot_counts.get(x, 0) + 1
    makespan = max((r.finish for r in served), default=0.0)
    qs = queue.stats()
    return SimResult(
        policy=label or policy.name,
        workload=workload,
        num_replicas=num_replicas,
        num_requests=len(requests),
        hit_rate=hits / prompt_tokens if prompt_tokens else 0.0,
        oracle_hit_rate=oracle if oracle is not None else float("nan"),
        ttft_mean_s=sum(ttft) / len(ttft) if ttft else 0.0,
        ttft_p50_s=_pct(ttft, 0.5),
        ttft_p90_s=_pct(ttft, 0.9),
        ttft_p99_s=_pct(ttft, 0.99),
        e2e_mean_s=sum(r.finish - r.arrival for r in served) / len(served) if served else 0.0,
        makespan_s=makespan,
        throughput_rps=len(served) / makespan if makespan else 0.0,
        rejected=rejected,
        queue_max_len=queue_max,
        queue_wait_p99_s=qs.wait_p99_s,
        spilled=spilled,
        preemptions=sum(rep.num_preemptions for rep in replicas),
        load_imbalance=max(per_rep) / (sum(per_rep) / len(per_rep)) if sum(per_rep) else 0.0,
        hot_prefix_replicas=len(hot_counts),
        hot_prefix_max_share=max(hot_counts.values()) / len(hot) if hot else 0.0,
        wall_s=time.perf_counter() - wall0,
    )


def _snap(rep: SimReplica):
    from rayfleet.engine.kv_events import KVSnapshot

    rep.events.flush()
    return KVSnapshot(rep.events.epoch, rep.events.last_seq, rep.pool.cached_hashes())


# ---- sweep, table, figure ----------------------------------------------------------------
def sweep(args: argparse.Namespace, cm: CostModel, workload: str, log=print) -> list[SimResult]:
    results = []
    for n in args.replicas:
        reqs = make_workload(
            workload,
            n,
            prompts_per_replica=args.prompts_per_replica,
            groups_per_replica=args.groups_per_replica,
            prompts_per_group=args.prompts_per_group,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            output_len=args.output_len,
            hot_share=args.hot_share,
            rate=args.rate_per_replica,
            block_size=cm.block_size,
            seed=args.seed + n,
        )
        oracle = oracle_hit_rate(reqs, n * cm.num_blocks, cm.block_size)
        for name in args.policies:
            clock = SimClock()
            policy = make_policy(
                name,
                cm,
                args.load_bound_epsilon,
                args.seed,
                clock,
                weights=weights_from_args(args),
                slack=args.load_bound_slack,
            )
            res = simulate(
                reqs, n, policy, cm, workload=workload, label=name, clock=clock, oracle=oracle
            )
            log(format_row(res))
            results.append(res)
    return results


HEADER = (
    f"{'policy':<20}{'N':>5}{'reqs':>7}{'hit':>7}{'oracle':>8}{'ttft p50':>10}"
    f"{'ttft p99':>10}{'e2e':>8}{'req/s':>8}{'spill':>7}{'preempt':>8}{'imbal':>7}{'g0N':>6}"
)


def format_row(r: SimResult) -> str:
    return (
        f"{r.policy:<20}{r.num_replicas:>5}{r.num_requests:>7}{r.hit_rate:>7.1%}"
        f"{r.oracle_hit_rate:>8.1%}{r.ttft_p50_s * 1000:>8.0f}ms{r.ttft_p99_s * 1000:>8.0f}ms"
        f"{r.e2e_mean_s:>7.2f}s{r.throughput_rps:>8.1f}{r.spilled:>7}{r.preemptions:>8}"
        f"{r.load_imbalance:>7.2f}{r.hot_prefix_replicas:>6}"
    )


def plot(results: list[SimResult], path: Path, title: str) -> Path:
    """One row per workload: hit rate (with the oracle) and TTFT p50/p99 against replicas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 4.2 * len(workloads)), squeeze=False)
    for (ax_hit, ax_ttft), wl in zip(axes, workloads, strict=True):
        rows = [r for r in results if r.workload == wl]
        policies = list(dict.fromkeys(r.policy for r in rows))
        for name in policies:
            rs = sorted((r for r in rows if r.policy == name), key=lambda r: r.num_replicas)
            xs = [r.num_replicas for r in rs]
            (line,) = ax_hit.plot(xs, [r.hit_rate * 100 for r in rs], marker="o", label=name)
            ax_ttft.plot(
                xs,
                [r.ttft_p50_s * 1000 for r in rs],
                marker="o",
                color=line.get_color(),
                label=f"{name} p50",
            )
            ax_ttft.plot(
                xs,
                [r.ttft_p99_s * 1000 for r in rs],
                marker="x",
                ls="--",
                color=line.get_color(),
                label=f"{name} p99",
            )
        first = sorted((r for r in rows if r.policy == policies[0]), key=lambda r: r.num_replicas)
        ax_hit.plot(
            [r.num_replicas for r in first],
            [r.oracle_hit_rate * 100 for r in first],
            "k:",
            marker=".",
            label="oracle (pooled LRU cache, infinite compute)",
        )
        for ax in (ax_hit, ax_ttft):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("replicas")
            ax.grid(True, alpha=0.3)
        ax_hit.set_title(f"{wl}: prefix-cache hit rate")
        ax_hit.set_ylabel("% of prompt tokens")
        ax_hit.set_ylim(0, 100)
        ax_hit.legend(fontsize=8)
        ax_ttft.set_title(f"{wl}: time to first token")
        ax_ttft.set_ylabel("TTFT (ms, simulated)")
        ax_ttft.set_yscale("log")
        ax_ttft.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument(
        "--policies",
        nargs="+",
        choices=POLICIES,
        default=["kv-aware", "power-of-two", "round-robin"],
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--prefill-ms-per-token", type=float)
    p.add_argument("--decode-step-ms", type=float)
    p.add_argument("--decode-ms-per-seq", type=float)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--num-blocks", type=int, help="KV blocks per replica")
    p.add_argument("--block-size", type=int)
    p.add_argument(
        "--rate-per-replica", type=float, help="requests/s per replica (default: preset)"
    )
    p.add_argument(
        "--prompts-per-replica", type=int, default=16, help="random / skewed: prompts per replica"
    )
    p.add_argument(
        "--groups-per-replica",
        type=float,
        default=2.0,
        help="shared-prefix: prefix groups per replica",
    )
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--hot-share", type=float, default=0.8, help="skewed: share of the hot prefix")
    p.add_argument("--load-bound-epsilon", type=float, default=RouterConfig().load_bound_epsilon)
    p.add_argument("--load-bound-slack", type=int, default=RouterConfig().load_bound_slack)
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        type=key_value,
        metavar="NAME=VALUE",
        help="a kv-aware cost weight (router.weights.NAME), e.g. stall_token=0.5; repeatable",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="loadtests/results")
    p.add_argument("--no-plot", action="store_true")
    return p


def weights_from_args(args: argparse.Namespace) -> CostWeights:
    """The router's default cost weights with `--weight NAME=VALUE` applied (validated)."""
    w = CostWeights().model_dump()
    for name, value in getattr(args, "weight", None) or ():
        w[name] = float(value)
    return CostWeights(**w)


def cost_model_from_args(args: argparse.Namespace) -> CostModel:
    cm = CostModel(**asdict(PRESETS[args.preset]))
    for name in (
        "prefill_ms_per_token",
        "decode_step_ms",
        "decode_ms_per_seq",
        "max_num_seqs",
        "max_num_batched_tokens",
        "num_blocks",
        "block_size",
        "rate_per_replica",
    ):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cm, name, v)
    if args.rate_per_replica is None:
        args.rate_per_replica = cm.rate_per_replica
    return cm


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cm = cost_model_from_args(args)
    if -(-(args.prefix_len + args.suffix_len) // cm.block_size) > cm.num_blocks:
        raise SystemExit("a prompt needs more KV blocks than a replica has (--num-blocks)")
    print(f"preset={args.preset} {cm}", flush=True)
    t0 = time.perf_counter()
    results = []
    for wl in args.workload:
        print(f"\nworkload: {wl}", flush=True)
        print(HEADER, flush=True)
        results += sweep(args, cm, wl, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "sim_router" + ("" if args.preset == "cpu" else f"_{args.preset}")
    doc = {
        "args": {k: v for k, v in vars(args).items() if k != "result_dir"},
        "cost_model": asdict(cm),
        "weights": weights_from_args(args).model_dump(),
        "wall_s": wall,
        "results": [asdict(r) for r in results],
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {json_path} ({wall:.1f}s)")
    if not args.no_plot:
        png = plot(
            results,
            out_dir / f"{stem}.png",
            f"rayfleet router simulation: {args.preset} cost model, "
            f"{args.rate_per_replica:g} req/s per replica",
        )
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
