"""Routing policies and the fleet-wide admission queue: pure Python, no Ray.

Rule: among the replicas with room for the request, kv-aware routing picks the cheapest by
one cost (estimated wait for the first token, in prefill-token equivalents: the prompt
tokens it must prefill there plus that replica's queued work), skipping any replica whose
load passed the bound `max(ceil((1 + eps) x m), ceil(m) + slack)` with m = (total + 1) / n,
so a hot prefix spreads instead of piling onto one replica. Ties break at random. When no replica has room, the request
waits in the `AdmissionQueue` and binds to a replica the moment one has room.

The Ray Serve request router (and `loadtests/sim_router.py`) call exactly this code.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .prefix_index import ApproximatePrefixIndex, PrefixIndex
from .router_config import AdmissionQueueConfig, CostWeights, RouterConfig

ReplicaId = Hashable
T = TypeVar("T")
R = TypeVar("R")


# A prefix is replicated for its share of traffic only once seen this often in the window.
HOT_PREFIX_MIN_COUNT = 8


# ---- replica load ----------------------------------------------------------------------
@dataclass(slots=True)
class ReplicaLoad:
    """What the router knows about one replica's load when it places a request.

    The first fields come from the replica's engine stats, reported through Serve's routing
    stats (they lag by up to `stats_poll_interval_s`);
    `inflight` / `inflight_prefill_tokens` / `inflight_prompt_tokens` are requests this
    router sent since those stats were taken, which they do not reflect yet: their count,
    the prompt tokens they will prefill (less what the index said the replica caches: the
    queue they add) and all their prompt tokens (the KV blocks they may take).
    """

    replica_id: ReplicaId
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 1
    max_num_seqs: int = 128
    queued_prefill_tokens: int = 0  # tokens still to prefill: waiting + unfinished prefills
    block_size: int = 16
    inflight: int = 0
    inflight_prefill_tokens: int = 0
    inflight_prompt_tokens: int = 0

    @property
    def num_requests(self) -> int:
        """Requests on the replica or on their way: the load the hot-prefix bound counts."""
        return self.num_running + self.num_waiting + self.inflight

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 1.0

    @classmethod
    def from_stats(
        cls,
        replica_id: ReplicaId,
        stats: Any,
        max_num_seqs: int,
        queued_prefill_tokens: int | None = None,
    ) -> ReplicaLoad:
        """From a `rayfleet.engine.EngineStats` (or anything with the same fields)."""
        if queued_prefill_tokens is None:
            queued_prefill_tokens = int(getattr(stats, "queued_prefill_tokens", 0))
        return cls(
            replica_id=replica_id,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting + getattr(stats, "num_swapped", 0),
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            max_num_seqs=max_num_seqs,
            queued_prefill_tokens=queued_prefill_tokens,
            block_size=stats.block_size,
        )


def blocks_needed(num_prompt_tokens: int, block_size: int, cached_blocks: int = 0) -> int:
    """KV blocks a prompt needs freshly allocated on a replica caching `cached_blocks` of it."""
    return max(0, -(-num_prompt_tokens // block_size) - cached_blocks)


def has_capacity(load: ReplicaLoad, prompt_blocks: int) -> bool:
    """Can this replica start the request now: under its running cap (running, waiting and
    in-flight requests all count), and enough free KV blocks for `prompt_blocks` new blocks
    after the blocks its in-flight prompts will take?"""
    if load.num_requests >= load.max_num_seqs:
        return False
    reserved = -(-load.inflight_prompt_tokens // load.block_size)
    return load.num_free_blocks - reserved >= prompt_blocks


# ---- placement -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Placement:
    replica_id: ReplicaId
    cached_blocks: int = 0  # leading prompt blocks the index says the replica caches
    cost: float = 0.0
    # The load bound turned away a replica caching more of the prompt than the chosen one.
    spilled: bool = False


class RoutingPolicy(ABC):
    name: str = ""

    @abstractmethod
    def choose(
        self,
        loads: Sequence[ReplicaLoad],
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
    ) -> Placement | None:
        """The replica for this request, or None when none has room (queue it)."""

    def on_placed(self, replica_id: ReplicaId, block_hashes: Sequence[int]) -> None:
        """The request was sent to `replica_id` (feeds the approximate index)."""
        return None

    def on_replica_removed(self, replica_id: ReplicaId) -> None:
        """A replica died or was scaled down."""
        return None


class KVAwarePolicy(RoutingPolicy):
    """Cheapest replica by estimated time to first token, under a bounded-load cap.

    For replica r, with c(r) the prompt's leading blocks r caches (from the index), B its
    block size and N the prompt's length in tokens (the last token is always computed):

        cost(r) = w.prefill_token        * (N - min(c(r) * B, N - 1))
                + w.queued_prefill_token * (queued_prefill_tokens(r) + inflight_prefill_tokens(r))
                + w.running_request      * num_running(r)
                + w.waiting_request      * (num_waiting(r) + inflight(r))
                + w.kv_usage             * kv_usage(r)

    Units: every weight is in prefill-token equivalents (the engine's time to prefill one
    token), per token, per request, or per full KV pool; see `CostWeights`. Defaults, for
    the CPU engine (prefill ~0.4 ms/token, decode step ~40 ms + 1 ms per sequence):
    - prefill_token 2: an uncached token counts twice, once for this request's wait and
      once for the work it queues ahead of every later request on that replica. At 1 (the
      myopic TTFT estimate) misses feed on themselves under load: the replicas holding a
      prefix look busy with others' misses, so it is computed again elsewhere (in
      `loadtests/sim_router.py`, shared-prefix, 32 CPU replicas at 3 req/s each: hit rate
      51% and TTFT p50 476 ms at 1; 73% and 115 ms at 2; power-of-two 10% and 1.8 s);
    - queued_prefill_token 1: queued prompt tokens run before ours, token for token;
    - running_request 8: a running request's decode share of the steps our prefill rides in;
    - waiting_request 64: a request scheduled ahead of ours (its first step, its overhead);
    - kv_usage 64 at a full pool: new blocks evict someone's cached prefix.

    Only replicas with room (`has_capacity`) compete. Among them, a replica whose load
    (`ReplicaLoad.num_requests`) reached the bound is passed over, however long its match,
    unless every replica with room is over it. With m = (total + 1) / n the mean load
    counting this request, the bound is

        max(ceil((1 + eps) * m), ceil(m) + slack)

    The first term is consistent hashing with bounded loads: no replica above (1 + eps)
    times the mean. It alone is too tight at the loads a CPU fleet runs (a few requests in
    flight): with 3 replicas and 3 requests it turns a replica away at 2, and each such
    spill re-prefills a whole prefix elsewhere (512 tokens: ~1.3 CPU-s here) to save a
    request's share of batched decode steps (a few ms each). `slack` (default 2 requests)
    lets a replica run that many above the mean before the bound applies; past a mean of
    ~2 * slack / eps the relative term rules. In `loadtests/sim_router.py` with the
    `bench router` workloads (3 CPU replicas, 0.6 req/s, 5 seeds) slack 2 took spills from
    7-13 to 0-1 per run and the shared-prefix hit rate from 0.88-0.91 of the oracle to
    0.98-0.99, with the same median TTFT.

    Hot prefixes are replicated: a prompt whose first block led a share f of the last
    `hot_prefix_window` placements should be cached on ceil(f * n) replicas. While fewer
    hold it, it goes to the least-loaded replica with room that does not, when that one
    is less loaded than the holder the cost picked (see `_replica_for_hot_prefix`).
    Exact cost ties break uniformly at random.
    """

    name = "kv-aware"

    def __init__(
        self,
        index: PrefixIndex | ApproximatePrefixIndex | None = None,
        weights: CostWeights | None = None,
        load_bound_epsilon: float | None = 0.5,
        rng: random.Random | None = None,
        pending: ApproximatePrefixIndex | None = None,
        load_bound_slack: int = 2,
        hot_prefix_window: int = 64,
    ) -> None:
        if load_bound_epsilon is not None and load_bound_epsilon < 0:
            raise ValueError(f"load_bound_epsilon must be >= 0 or None, got {load_bound_epsilon}")
        if load_bound_slack < 0:
            raise ValueError(f"load_bound_slack must be >= 0, got {load_bound_slack}")
        if hot_prefix_window < 0:
            raise ValueError(f"hot_prefix_window must be >= 0, got {hot_prefix_window}")
        self.load_bound_slack = load_bound_slack
        # First block hash of the last `hot_prefix_window` placements, and their counts.
        self._recent: deque[int] = deque(maxlen=hot_prefix_window or None)
        self._recent_counts: dict[int, int] = {}
        self.hot_prefix_window = hot_prefix_window
        self.index = index if index is not None else PrefixIndex()
        self.weights = weights or CostWeights()
        self.load_bound_epsilon = load_bound_epsilon
        self.rng = rng or random.Random()
        # With an exact index: this router's own recent placements (short TTL), counted as
        # cached until the replica's KV events catch up, so a burst of one prefix does not
        # scatter while its first prefill runs.
        self.pending = pending if isinstance(self.index, PrefixIndex) else None

    def _match(self, loads: Sequence[ReplicaLoad], block_hashes: Sequence[int]) -> dict:
        ids = [x.replica_id for x in loads]
        matched = self.index.match(ids, block_hashes)
        if self.pending is not None and self.pending.num_hashes:
            for rid, n in self.pending.match(ids, block_hashes).items():
                if n > matched[rid]:
                    matched[rid] = n
        return matched

    def load_bound(self, loads: Sequence[ReplicaLoad]) -> float:
        """Load (requests) at which a replica takes no new request (see the class doc)."""
        if not loads:
            return math.inf
        return self._bound(sum(x.num_requests for x in loads), len(loads))

    def _bound(self, total: int, n: int) -> float:
        eps = self.load_bound_epsilon
        if eps is None:
            return math.inf
        mean = (total + 1) / n
        return max(math.ceil((1.0 + eps) * mean), math.ceil(mean) + self.load_bound_slack)

    def costs(
        self,
        loads: Sequence[ReplicaLoad],
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
    ) -> dict[ReplicaId, tuple[float, int]]:
        """(cost, cached blocks) of every replica, with or without room (for tests and docs)."""
        matched = self._match(loads, block_hashes)
        return {
            x.replica_id: (
                self._cost(x, matched[x.replica_id], num_prompt_tokens),
                matched[x.replica_id],
            )
            for x in loads
        }

    def _cost(self, x: ReplicaLoad, cached_blocks: int, n: int) -> float:
        w = self.weights
        uncached = n - min(cached_blocks * x.block_size, max(0, n - 1))
        return (
            w.prefill_token * uncached
            + w.queued_prefill_token * (x.queued_prefill_tokens + x.inflight_prefill_tokens)
            + w.running_request * x.num_running
            + w.waiting_request * (x.num_waiting + x.inflight)
            + w.kv_usage * x.kv_usage
        )

    def choose(
        self,
        loads: Sequence[ReplicaLoad],
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
    ) -> Placement | None:
        if not loads:
            return None
        if num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be >= 1, got {num_prompt_tokens}")
        n = num_prompt_tokens
        matched = self._match(loads, block_hashes) if block_hashes else {}
        w = self.weights
        wp, wq, wr = w.prefill_token, w.queued_prefill_token, w.running_request
        ww, wk = w.waiting_request, w.kv_usage
        # One pass: the cost of every replica with room (has_capacity and _cost, inlined:
        # this loop is the decision's hot path), and the total load for the bound.
        total = 0
        scored = []
        for x in loads:
            nreq = x.num_running + x.num_waiting + x.inflight
            total += nreq
            if nreq >= x.max_num_seqs:
                continue
            bs = x.block_size
            cached = matched.get(x.replica_id, 0)
            ipt = x.inflight_prefill_tokens
            if x.num_free_blocks + (x.inflight_prompt_tokens // -bs) < -(n // -bs) - cached:
                continue
            hit = cached * bs
            tb = x.num_total_blocks
            cost = (
                wp * (n - (hit if hit < n - 1 else n - 1))
                + wq * (x.queued_prefill_tokens + ipt)
                + wr * x.num_running
                + ww * (x.num_waiting + x.inflight)
                + wk * (1.0 - x.num_free_blocks / tb if tb else 1.0)
            )
            scored.append((cost, nreq, cached, x))
        if not scored:
            return None
        bound = self._bound(total, len(loads))
        rand = self.rng.random
        # Best within the bound; failing that, best over it. Ties: each of k tied is kept
        # with probability 1/k (uniform, one pass).
        best = best_over = None
        ties = ties_over = 0
        longest_over = -1  # longest match among replicas the bound turned away
        for item in scored:
            if item[1] >= bound:
                if item[2] > longest_over:
                    longest_over = item[2]
                if best_over is None or item[0] < best_over[0] - 1e-9:
                    best_over, ties_over = item, 1
                elif item[0] <= best_over[0] + 1e-9:
                    ties_over += 1
                    if rand() * ties_over < 1.0:
                        best_over = item
            elif best is None or item[0] < best[0] - 1e-9:
                best, ties = item, 1
            elif item[0] <= best[0] + 1e-9:
                ties += 1
                if rand() * ties < 1.0:
                    best = item
        spilled = best is not None and longest_over > best[2]
        if best is None:
            best = best_over
        elif best[2] and block_hashes:
            spread = self._replica_for_hot_prefix(block_hashes[0], len(loads), matched, scored)
            if spread is not None and spread[1] < best[1]:
                best, spilled = spread, True
        return Placement(
            replica_id=best[3].replica_id, cached_blocks=best[2], cost=best[0], spilled=spilled
        )

    def _replica_for_hot_prefix(
        self, first_hash: int, num_replicas: int, matched: dict, scored: list
    ) -> tuple | None:
        """The least-loaded replica with room that does not cache the prompt, when its
        prefix is hot and too few replicas hold it; else None.

        A prefix that led a share f of the last `hot_prefix_window` placements should be held
        by ceil(f * n) replicas, so that its load can balance across them. The load bound
        alone does not get there: it turns away only a replica past it, and the second
        holder of a prefix always looks cheaper than a miss on a third. In the `bench router`
        skewed run (80% of requests on one prefix, 3 replicas) the prefix stayed on two
        replicas, which took 0.48 and 0.42 of the prompt tokens and ran hot. The caller
        takes this replica only if it is less loaded than the cheapest holder, so a hot
        prefix on an idle fleet is left where it is cached."""
        window = len(self._recent)
        count = self._recent_counts.get(first_hash, 0)
        # Too few sightings say nothing about a share: with 256 replicas, a prefix seen
        # twice in 64 placements would claim 8 holders (the simulator's shared-prefix hit
        # rate fell from 0.77 to 0.70 that way).
        if window < max(HOT_PREFIX_MIN_COUNT, self.hot_prefix_window // 4):
            return None
        if count < HOT_PREFIX_MIN_COUNT:
            return None
        share = count / window
        want = min(num_replicas, math.ceil(share * num_replicas - 1e-9))
        holders = sum(1 for n in matched.values() if n > 0)
        if holders >= want:
            return None
        cold = [item for item in scored if item[2] == 0]
        return min(cold, key=lambda item: (item[1], item[0])) if cold else None

    def on_placed(self, replica_id: ReplicaId, block_hashes: Sequence[int]) -> None:
        if not block_hashes:
            return
        if self.hot_prefix_window:
            first = block_hashes[0]
            if len(self._recent) == self._recent.maxlen:
                old = self._recent[0]
                left = self._recent_counts[old] - 1
                if left:
                    self._recent_counts[old] = left
                else:
                    del self._recent_counts[old]
            self._recent.append(first)
            self._recent_counts[first] = self._recent_counts.get(first, 0) + 1
        if isinstance(self.index, ApproximatePrefixIndex):
            self.index.record(replica_id, block_hashes)
        elif self.pending is not None:
            self.pending.record(replica_id, block_hashes)

    def on_replica_removed(self, replica_id: ReplicaId) -> None:
        self.index.remove_replica(replica_id)
        if self.pending is not None:
            self.pending.remove_replica(replica_id)


class PowerOfTwoPolicy(RoutingPolicy):
    """Ray Serve's default: two random replicas with room, the less loaded wins."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(
        self,
        loads: Sequence[ReplicaLoad],
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
    ) -> Placement | None:
        ok = [x for x in loads if has_capacity(x, blocks_needed(num_prompt_tokens, x.block_size))]
        if not ok:
            return None
        if len(ok) == 1:
            return Placement(ok[0].replica_id)
        a, b = self.rng.sample(ok, 2)
        if b.num_requests < a.num_requests:
            a = b
        return Placement(a.replica_id, cost=float(a.num_requests))


class RoundRobinPolicy(RoutingPolicy):
    """Each replica in turn, skipping the ones without room."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self,
        loads: Sequence[ReplicaLoad],
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
    ) -> Placement | None:
        n = len(loads)
        for i in range(n):
            x = loads[(self._next + i) % n]
            if has_capacity(x, blocks_needed(num_prompt_tokens, x.block_size)):
                self._next = (self._next + i + 1) % n
                return Placement(x.replica_id)
        return None


def build_policy(
    config: RouterConfig,
    index: PrefixIndex | ApproximatePrefixIndex | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RoutingPolicy:
    """The policy `config.policy` names. kv-aware gets an exact index when KV events are on
    (plus the short-lived index of its own pending placements, unless
    `pending_placement_ttl_s` is null), else an approximate one (unless `index` is given)."""
    rng = rng or random.Random(config.seed)
    if config.policy == "power-of-two":
        return PowerOfTwoPolicy(rng)
    if config.policy == "round-robin":
        return RoundRobinPolicy()
    if index is None:
        index = (
            PrefixIndex()
            if config.kv_events
            else ApproximatePrefixIndex(
                config.approx_blocks_per_replica, config.approx_ttl_s, clock=clock
            )
        )
    pending = None
    if isinstance(index, PrefixIndex) and config.pending_placement_ttl_s is not None:
        pending = ApproximatePrefixIndex(
            config.approx_blocks_per_replica, config.pending_placement_ttl_s, clock=clock
        )
    return KVAwarePolicy(
        index,
        config.weights,
        config.load_bound_epsilon,
        rng,
        pending,
        config.load_bound_slack,
        config.hot_prefix_window,
    )


# ---- admission queue -------------------------------------------------------------------
class QueueFull(Exception):
    """The admission queue is full (or the request waited past `max_wait_s`): answer 429
    with `Retry-After: <retry_after_header>`."""

    def __init__(self, queue_len: int, retry_after_s: float, reason: str = "full") -> None:
        self.queue_len = queue_len
        self.retry_after_s = retry_after_s
        self.reason = reason
        super().__init__(
            f"admission queue {reason} ({queue_len} waiting); retry after {retry_after_s:.1f}s"
        )

    @property
    def retry_after_header(self) -> str:
        """The `Retry-After` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(eq=False)
class QueueTicket(Generic[T]):
    item: T
    priority: int
    enqueued_at: float
    is_gone: Callable[[], bool] | None = None  # the client left: drop instead of binding
    alive: bool = True


@dataclass
class QueueStats:
    length: int
    max_len: int
    admitted_total: int  # bound to a replica (fast path included)
    queued_total: int  # had to wait
    rejected_total: int  # 429: queue full
    timed_out_total: int  # 429: waited past max_wait_s
    dropped_total: int  # client gone while queued
    wait_p50_s: float  # over the last `window` waits (fast-path admissions count as 0)
    wait_p99_s: float
    wait_max_s: float


class AdmissionQueue(Generic[T]):
    """One bounded queue of requests waiting for a replica with room (late binding).

    Order: lower `priority` first (vLLM's convention; default 0), FIFO within a priority.
    Strict head-of-line: a later request never binds before an earlier one of the same or a
    better priority.

    Two ways to drive it, over the same core:
    - async (the router): `await wait(try_place, priority)` returns `try_place()`'s first
      non-None result, tried at once when nobody is queued, then again on every `notify()`
      (call it whenever capacity may have appeared: a request finished, stats refreshed,
      a replica joined). A cancelled waiter (its client left) leaves the queue.
    - sync (the simulator): `push(item)`, then `drain(try_bind)` binds items in order
      while `try_bind(item)` succeeds.
    """

    def __init__(
        self,
        max_len: int = 1024,
        min_retry_after_s: float = 1.0,
        max_retry_after_s: float = 60.0,
        max_wait_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
        window: int = 2048,
        on_length: Callable[[int], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        if not 0 < min_retry_after_s <= max_retry_after_s:
            raise ValueError(
                f"need 0 < min_retry_after_s ({min_retry_after_s}) <= "
                f"max_retry_after_s ({max_retry_after_s})"
            )
        self.max_len = max_len
        self.min_retry_after_s = min_retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self.max_wait_s = max_wait_s
        self._clock = clock
        # Metric hooks: every admission's wait (0 on the fast path), the queue's length
        # after each change, each 429 ("full" or "timeout").
        self._on_wait = on_wait
        self._on_length = on_length
        self._on_reject = on_reject
        self._heap: list[tuple[int, int, QueueTicket[T]]] = []
        self._seq = itertools.count()
        self._len = 0
        self._waits: deque[float] = deque(maxlen=window)
        self._bind_interval_s: float | None = None  # EMA of the time between binds
        self._last_bind: float | None = None
        self.admitted_total = 0
        self.queued_total = 0
        self.rejected_total = 0
        self.timed_out_total = 0
        self.dropped_total = 0

    @classmethod
    def from_config(cls, config: AdmissionQueueConfig, **kwargs: Any) -> AdmissionQueue:
        return cls(
            max_len=config.max_len,
            min_retry_after_s=config.min_retry_after_s,
            max_retry_after_s=config.max_retry_after_s,
            max_wait_s=config.max_wait_s,
            **kwargs,
        )

    def __len__(self) -> int:
        return self._len

    # ---- sync core -------------------------------------------------------------------
    def retry_after_s(self) -> float:
        """How long until a request would likely bind: queue length x time between binds."""
        est = self.min_retry_after_s
        if self._bind_interval_s is not None:
            est = (self._len + 1) * self._bind_interval_s
        return min(self.max_retry_after_s, max(self.min_retry_after_s, est))

    def push(
        self, item: T, priority: int = 0, is_gone: Callable[[], bool] | None = None
    ) -> QueueTicket[T]:
        """Queue an item; raises QueueFull when `max_len` are already waiting."""
        if self._len >= self.max_len:
            self.rejected_total += 1
            if self._on_reject is not None:
                self._on_reject("full")
            raise QueueFull(self._len, self.retry_after_s())
        ticket = QueueTicket(item, priority, self._clock(), is_gone)
        heapq.heappush(self._heap, (priority, next(self._seq), ticket))
        self._len += 1
        self.queued_total += 1
        self._length_changed()
        return ticket

    def remove(self, ticket: QueueTicket[T]) -> bool:
        """Take a ticket out (its client left); False if it was no longer queued."""
        if not ticket.alive:
            return False
        ticket.alive = False
        self._len -= 1
        self.dropped_total += 1
        self._compact()
        self._length_changed()
        return True

    def drain(self, try_bind: Callable[[T], bool]) -> int:
        """Bind queued items in order while `try_bind(item)` succeeds; returns how many."""
        bound = 0
        before = self._len
        heap = self._heap
        while heap:
            ticket = heap[0][2]
            if not ticket.alive:
                heapq.heappop(heap)
                continue
            if ticket.is_gone is not None and ticket.is_gone():
                heapq.heappop(heap)
                ticket.alive = False
                self._len -= 1
                self.dropped_total += 1
                continue
            if not try_bind(ticket.item):
                break
            heapq.heappop(heap)
            ticket.alive = False
            self._len -= 1
            self._record_bind(self._clock() - ticket.enqueued_at)
            bound += 1
        if self._len != before:
            self._length_changed()
        return bound

    def expire(self) -> list[T]:
        """Remove items queued longer than `max_wait_s` (they get 429); returns them."""
        if self.max_wait_s is None:
            return []
        deadline = self._clock() - self.max_wait_s
        out = []
        for _, _, ticket in self._heap:
            if ticket.alive and ticket.enqueued_at <= deadline:
                ticket.alive = False
                self._len -= 1
                self.timed_out_total += 1
                out.append(ticket.item)
                if self._on_reject is not None:
                    self._on_reject("timeout")
        self._compact()
        if out:
            self._length_changed()
        return out

    def _length_changed(self) -> None:
        if self._on_length is not None:
            self._on_length(self._len)

    def _compact(self) -> None:
        # Dead tickets are skipped lazily; rebuild when they outnumber the live ones.
        if len(self._heap) > 64 and len(self._heap) > 2 * self._len:
            self._heap = [e for e in self._heap if e[2].alive]
            heapq.heapify(self._heap)

    def _record_bind(self, waited_s: float) -> None:
        now = self._clock()
        if self._last_bind is not None:
            dt = now - self._last_bind
            prev = self._bind_interval_s
            self._bind_interval_s = dt if prev is None else 0.8 * prev + 0.2 * dt
        self._last_bind = now
        self.admitted_total += 1
        self._waits.append(waited_s)
        if self._on_wait is not None:
            self._on_wait(waited_s)

    def record_fast_path(self) -> None:
        """A request bound at once, never queued (counts as a zero wait)."""
        self._record_bind(0.0)

    # ---- async -----------------------------------------------------------------------
    async def wait(
        self,
        try_place: Callable[[], R | None],
        priority: int = 0,
        release: Callable[[R], None] | None = None,
    ) -> R:
        """The first non-None `try_place()`: at once if nobody waits, else when this
        request reaches the head of the queue and a replica has room.

        Raises QueueFull (queue full, or waited past `max_wait_s`). If the caller is
        cancelled after a placement was made for it but before it resumed, `release`
        gets that placement back (so the router can undo its in-flight accounting).
        """
        if self._len == 0:
            placed = try_place()
            if placed is not None:
                self.record_fast_path()
                return placed
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        ticket = self.push((try_place, fut), priority, is_gone=fut.done)
        timer = None
        if self.max_wait_s is not None:
            timer = loop.call_later(self.max_wait_s, self._time_out, ticket)
        self.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            if ticket.alive:
                self.remove(ticket)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                if release is not None:
                    release(fut.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def notify(self) -> int:
        """Capacity may have appeared: bind waiting requests in order. Returns how many."""
        return self.drain(self._bind_waiter)

    @staticmethod
    def _bind_waiter(item: Any) -> bool:
        try_place, fut = item
        placed = try_place()
        if placed is None:
            return False
        fut.set_result(placed)
        return True

    def _time_out(self, ticket: QueueTicket) -> None:
        if not ticket.alive:
            return
        ticket.alive = False
        self._len -= 1
        self.timed_out_total += 1
        self._compact()
        self._length_changed()
        if self._on_reject is not None:
            self._on_reject("timeout")
        _, fut = ticket.item
        if not fut.done():
            fut.set_exception(QueueFull(self._len, self.retry_after_s(), reason="timeout"))

    # ---- metrics ---------------------------------------------------------------------
    def stats(self) -> QueueStats:
        waits = sorted(self._waits)

        def q(p: float) -> float:
            return waits[min(len(waits) - 1, int(p * len(waits)))] if waits else 0.0

        return QueueStats(
            length=self._len,
            max_len=self.max_len,
            admitted_total=self.admitted_total,
            queued_total=self.queued_total,
            rejected_total=self.rejected_total,
            timed_out_total=self.timed_out_total,
            dropped_total=self.dropped_total,
            wait_p50_s=q(0.5),
            wait_p99_s=q(0.99),
            wait_max_s=waits[-1] if waits else 0.0,
        )
