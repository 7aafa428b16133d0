"""KVAwareRequestRouter: the routing policy and admission queue, inside Ray Serve's router.

Ray Serve routes every `DeploymentHandle` call through a `RequestRouter` living in the
caller's process (here: each ingress replica). This one places `LLMServer.generate` calls
with `rayfleet.cluster.routing_policy` (kv-aware by default) and parks requests that find
no replica with room in the fleet's `AdmissionQueue` (late binding).

How the router learns about replicas (Serve has no push or pull channel from a replica to
the routers other than routing stats):
- Every `request_routing_stats_period_s` the controller calls `LLMServer.record_routing_stats`
  and broadcasts the latest dict to every router (long poll: a router may skip reports).
  `RoutingStatsReporter` builds that dict: the engine's load (running, waiting, free/total
  KV blocks, block size, max_num_seqs, queued prefill tokens), the served model's name and
  its KV events. Because a router may miss reports, each report carries the KV event
  batches of the last `window_reports` reports, not only the new ones (so a router that
  missed fewer than that is exact after the next one it gets), and a full `KVSnapshot`
  every `snapshot_every` reports (and whenever the replica's own cursor saw a gap or a new
  epoch). A router applies the numbered batches (`PrefixIndex.apply_batch`); on a gap or a
  new epoch it resyncs from the next report that carries a snapshot, keeping its older
  view of that replica meanwhile (the one lag by design: at most `snapshot_every` reports).
- Between reports, the policy's pending-placement overlay counts a prompt as cached on the
  replica it was just sent to, and `ReplicaLoad.inflight` counts requests this router sent
  that the replica's last report does not cover (completions since the last report are
  subtracted from its running count). A report says when it was made (`at`, wall clock) and
  counts every request that had reached the engine by then, including those the engine's
  last step has not seen yet (`AsyncLLMEngine.load_snapshot`); a reservation ends with the
  first report made more than `REPORT_TRANSIT_S` after it was placed.

The request's prompt facts come from the ingress as a `RouteHint` on the request
(`GenerateRequest.route`, which the replica ignores): chained block hashes of the whole
rendered prompt (`hash_prompt_blocks`, as the engine computes them), its length, priority.
Calls without a hint (model_info, get_stats, ...) go to Ray's own queue-length choice.

When the admission queue is full (or a request waited past `queue.max_wait_s`) the request's
routing future fails with `QueueFull`, which Serve raises from the handle call; the ingress
answers 429 with Retry-After. Serve's own `max_queued_requests` bound is off (-1) under this
router unless `replica.max_queued_requests` is set (`app.request_router_options`): it also
counts the requests waiting here, so it would refuse them before the admission queue is
full. The queue's length, waits and refusals are Ray metrics (`metrics.RouterMetrics`).

`KVRouterCore` is the Ray-free part (tested without a cluster); `KVAwareRequestRouter` adapts
it to Serve's `RequestRouter` interface.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from rayfleet.engine import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVSnapshot,
)

from .metrics import RouterMetrics
from .prefix_index import PrefixIndex
from .route_hint import RouteHint  # not defined here: see route_hint.py
from .router_config import RouterConfig
from .routing_policy import (
    AdmissionQueue,
    QueueFull,
    ReplicaLoad,
    RoutingPolicy,
    blocks_needed,
    build_policy,
)

logger = logging.getLogger("ray.serve")

ROUTER_CLASS_PATH = "rayfleet.cluster.kv_router:KVAwareRequestRouter"
ROUTED_METHOD = "generate"
_UNKNOWN_BLOCKS = 1 << 30  # a replica that has not reported yet: assume room


# ---- KV events as plain data -------------------------------------------------------------
# Routing stats pass through the Serve controller, which unpickles them: tuples of builtins
# keep it from importing rayfleet.engine (and torch) there.
def encode_batch(b: KVEventBatch) -> tuple:
    events = []
    for e in b.events:
        if isinstance(e, BlockStored):
            events.append(("s", tuple(e.block_hashes)))
        elif isinstance(e, BlockRemoved):
            events.append(("r", tuple(e.block_hashes)))
        else:
            events.append(("c",))
    return (b.epoch, b.seq, tuple(events))


def decode_batch(b: Any) -> KVEventBatch:
    if isinstance(b, KVEventBatch):
        return b
    epoch, seq, raw = b
    events = []
    for e in raw:
        if e[0] == "s":
            events.append(BlockStored(tuple(e[1]), None))
        elif e[0] == "r":
            events.append(BlockRemoved(tuple(e[1])))
        else:
            events.append(AllBlocksCleared())
    return KVEventBatch(epoch, seq, 0.0, tuple(events))


def encode_snapshot(s: KVSnapshot) -> tuple:
    return (s.epoch, s.seq, tuple(s.block_hashes))


def decode_snapshot(s: Any) -> KVSnapshot | None:
    if s is None or isinstance(s, KVSnapshot):
        return s
    epoch, seq, hashes = s
    return KVSnapshot(epoch, seq, frozenset(hashes))


# ---- replica side ----------------------------------------------------------------------
class RoutingStatsReporter:
    """Builds `LLMServer.record_routing_stats`' dict from an `AsyncLLMEngine`.

    Keeps a cursor into the engine's KV event log. Each report carries the batches of the
    last `window_reports` reports (so a router that skipped a few broadcasts still follows)
    and a snapshot every `snapshot_every` reports or when the cursor saw a gap/new epoch.
    """

    def __init__(
        self,
        engine: Any,
        max_num_seqs: int,
        window_reports: int = 8,
        snapshot_every: int = 20,
        max_window_batches: int = 2048,
        kv: bool = True,
    ) -> None:
        self.engine = engine
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.snapshot_every = snapshot_every
        self.max_window_batches = max_window_batches
        self._after_seq = -1
        self._epoch: str | None = None
        self._window: deque[list] = deque(maxlen=window_reports)
        self._num_reports = 0

    def _take(self) -> list:
        # AsyncLLMEngine reads the events between two steps (under its engine lock).
        return list(self.engine.take_kv_events(self._after_seq))

    def _snapshot(self) -> Any:
        return self.engine.kv_snapshot()

    def report(self) -> dict[str, Any]:
        # `at` first: every request that reached the engine before it is counted below
        # (in the stats, or as not yet counted by them), so a router can tell which of its
        # placements this report covers (`KVRouterCore.update`).
        at = time.time()
        snap = getattr(self.engine, "load_snapshot", None)
        stats, uncounted, uncounted_tokens = snap() if snap else (self.engine.get_stats(), 0, 0)
        self._num_reports += 1
        out = {
            "report": self._num_reports,
            "at": at,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting + stats.num_swapped + uncounted,
            "num_free_blocks": stats.num_free_blocks,
            "num_total_blocks": stats.num_total_blocks,
            "block_size": stats.block_size,
            "max_num_seqs": self.max_num_seqs,
            "queued_prefill_tokens": int(getattr(stats, "queued_prefill_tokens", 0))
            + uncounted_tokens,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "model_name": str(getattr(self.engine, "model_name", "") or ""),
        }
        if self.kv:
            out["kv_batches"], out["kv_snapshot"] = self._kv()
        return out

    def _kv(self) -> tuple[list, Any]:
        batches = self._take()
        need_snapshot = (self._num_reports - 1) % self.snapshot_every == 0
        if batches:
            first = batches[0]
            if first.epoch != self._epoch:
                self._epoch = first.epoch
                self._window.clear()
                need_snapshot = True
            elif first.seq != self._after_seq + 1:
                need_snapshot = True  # the engine's buffer dropped batches we never sent
            self._after_seq = batches[-1].seq
        self._window.append([encode_batch(b) for b in batches])
        window = [b for part in self._window for b in part]
        if len(window) > self.max_window_batches:
            window = window[-self.max_window_batches :]
            need_snapshot = True
        snapshot = self._snapshot() if need_snapshot else None
        return window, (None if snapshot is None else encode_snapshot(snapshot))


# ---- router side (no Ray) --------------------------------------------------------------
@dataclass
class _Replica:
    load: ReplicaLoad
    report: Any = None  # the last report applied
    stats_at: float = 0.0  # when that report arrived (router clock)
    completed_since: int = 0  # requests placed before that report, finished since


@dataclass
class _Reservation:
    replica_id: str
    num_prompt_tokens: int
    placed_at: float  # router clock
    num_prefill_tokens: int = 0  # less the leading blocks the index said the replica caches
    placed_wall: float = 0.0  # wall clock, to compare with a report's `at`


# A request placed this long before a replica made its report may still have been on its way
# there (the handle hop takes ~3 ms on an idle 2-core box, more under load): its reservation
# outlives the report, counted twice until the next one rather than not at all. Without it a
# burst placed while a report was in flight looked like an idle replica, and a hot prefix
# piled onto one replica.
REPORT_TRANSIT_S = 0.05


class KVRouterCore:
    """Replica loads + prefix index + policy: what `choose_replicas` decides with.

    Replica ids are `ReplicaID.unique_id` strings. Not thread-safe (one event loop).
    """

    def __init__(
        self,
        config: RouterConfig,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.policy: RoutingPolicy = build_policy(config, clock=clock)
        self.index = getattr(self.policy, "index", None)
        self.exact = isinstance(self.index, PrefixIndex)
        self.replicas: dict[str, _Replica] = {}
        self._reservations: dict[str, _Reservation] = {}
        self.model_name = ""  # the replicas' served model (from their reports), for metrics

    # -- replicas ---------------------------------------------------------------------------
    def add(self, rid: str, max_ongoing: int | None = None) -> None:
        if rid in self.replicas:
            return
        load = ReplicaLoad(
            rid,
            num_free_blocks=_UNKNOWN_BLOCKS,
            num_total_blocks=_UNKNOWN_BLOCKS,
            max_num_seqs=max_ongoing or 128,
        )
        self.replicas[rid] = _Replica(load)
        if self.exact:
            self.index.add_replica(rid)

    def remove(self, rid: str) -> None:
        if self.replicas.pop(rid, None) is not None:
            self.policy.on_replica_removed(rid)
        for key in [k for k, r in self._reservations.items() if r.replica_id == rid]:
            del self._reservations[key]

    def sync(self, present: Iterable[str]) -> None:
        """Forget replicas no longer in the routing set."""
        keep = set(present)
        for rid in [r for r in self.replicas if r not in keep]:
            self.remove(rid)

    def update(self, rid: str, stats: dict[str, Any] | None, max_ongoing: int | None) -> bool:
        """Apply a replica's routing stats (no-op when unchanged). True if applied."""
        self.add(rid, max_ongoing)
        rep = self.replicas[rid]
        if not stats or stats.get("report") is None or stats.get("report") == rep.report:
            if max_ongoing:
                rep.load.max_num_seqs = min(rep.load.max_num_seqs, max_ongoing)
            return False
        rep.report = stats["report"]
        rep.stats_at = self.clock()
        if stats.get("model_name"):
            self.model_name = str(stats["model_name"])
        rep.completed_since = 0
        cap = int(stats.get("max_num_seqs", 128))
        rep.load = ReplicaLoad(
            rid,
            num_running=int(stats.get("num_running", 0)),
            num_waiting=int(stats.get("num_waiting", 0)),
            num_free_blocks=int(stats.get("num_free_blocks", 0)),
            num_total_blocks=int(stats.get("num_total_blocks", 1)),
            max_num_seqs=min(cap, max_ongoing) if max_ongoing else cap,
            queued_prefill_tokens=int(stats.get("queued_prefill_tokens", 0)),
            block_size=int(stats.get("block_size", 16)),
        )
        # Drop the reservations the report covers: those placed before the replica made it
        # (less the transit), or, from a replica that does not say when, before it arrived.
        at = stats.get("at")
        made = None if at is None else float(at) - REPORT_TRANSIT_S

        def covered(r: _Reservation) -> bool:
            return r.placed_at <= rep.stats_at if made is None else r.placed_wall <= made

        for key in [k for k, r in self._reservations.items() if r.replica_id == rid and covered(r)]:
            del self._reservations[key]
        self._recount(rid)
        if self.exact:
            self._apply_kv(rid, stats.get("kv_batches") or (), stats.get("kv_snapshot"))
        return True

    def _apply_kv(self, rid: str, batches: Sequence[Any], snapshot: Any) -> None:
        index: PrefixIndex = self.index
        batches = [decode_batch(b) for b in batches]
        snapshot = decode_snapshot(snapshot)
        if snapshot is not None and (index.needs_resync(rid) or index.last_seq(rid) < snapshot.seq):
            index.resync(rid, snapshot)
        gap = False
        for b in batches:
            gap |= index.apply_batch(rid, b)
        if gap and snapshot is not None:
            index.resync(rid, snapshot)
            for b in batches:
                index.apply_batch(rid, b)

    def _recount(self, rid: str) -> None:
        rep = self.replicas.get(rid)
        if rep is None:
            return
        n = tok = prefill = 0
        for r in self._reservations.values():
            if r.replica_id == rid:
                n += 1
                tok += r.num_prompt_tokens
                prefill += r.num_prefill_tokens
        rep.load.inflight = n
        rep.load.inflight_prompt_tokens = tok
        rep.load.inflight_prefill_tokens = prefill

    # -- requests ---------------------------------------------------------------------------
    def loads(self, rids: Iterable[str]) -> list[ReplicaLoad]:
        out = []
        for rid in rids:
            rep = self.replicas.get(rid)
            if rep is None:
                continue
            load = rep.load
            if rep.completed_since:
                load = replace(load, num_running=max(0, load.num_running - rep.completed_since))
            out.append(load)
        return out

    def place(self, rids: Iterable[str], hint: RouteHint, request_id: str) -> str | None:
        """Choose a replica among `rids` for a request and reserve it (None: none has room)."""
        self.release(request_id)  # a retry (the replica refused it): undo the last choice
        loads = self.loads(rids)
        n = max(1, hint.num_prompt_tokens)
        placement = self.policy.choose(loads, hint.block_hashes, n)
        cached_tokens = 0
        if placement is not None:
            rid = placement.replica_id
            block_size = next((x.block_size for x in loads if x.replica_id == rid), 1)
            cached_tokens = min(placement.cached_blocks * block_size, n - 1)
        elif loads and all(blocks_needed(n, x.block_size) > x.num_total_blocks for x in loads):
            # It will never fit: let a replica's engine refuse it (400) instead of waiting.
            rid = max(loads, key=lambda x: x.num_total_blocks).replica_id
        else:
            return None
        self.policy.on_placed(rid, hint.block_hashes)
        self._reservations[request_id] = _Reservation(
            rid, n, self.clock(), n - cached_tokens, self.wall_clock()
        )
        self._recount(rid)
        return rid

    def release(self, request_id: str) -> None:
        r = self._reservations.pop(request_id, None)
        if r is not None:
            self._recount(r.replica_id)

    def complete(self, rid: str, request_id: str) -> None:
        """A request finished on `rid` (counted in the replica's last report or not)."""
        r = self._reservations.pop(request_id, None)
        if r is not None:
            self._recount(r.replica_id)
        else:
            rep = self.replicas.get(rid)
            if rep is not None and rep.load.num_running > rep.completed_since:
                rep.completed_since += 1


def _router_name() -> str:
    """This router's metrics tag: the ingress replica it runs in, else the process."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (a driver's DeploymentHandle)
        return f"pid-{os.getpid()}"


def route_hint_of(pending_request: PendingRequest | None) -> RouteHint | None:
    """The request's RouteHint, for `generate` calls that carry one."""
    if pending_request is None:
        return None
    if getattr(pending_request.metadata, "call_method", None) != ROUTED_METHOD:
        return None
    hint = pending_request.kwargs.get("route") if pending_request.kwargs else None
    if isinstance(hint, RouteHint):
        return hint
    for a in pending_request.args or ():
        hint = a if isinstance(a, RouteHint) else getattr(a, "route", None)
        if isinstance(hint, RouteHint):
            return hint
    return None


# ---- the Ray Serve request router ------------------------------------------------------
class KVAwareRequestRouter(RequestRouter):
    """Ray Serve `RequestRouter` running `KVRouterCore` and the `AdmissionQueue`."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.router_config = RouterConfig.model_validate(kwargs)
        self.core = KVRouterCore(self.router_config)
        # Replicas seen dead (a request failed with ActorDiedError) that the controller may
        # still list until it notices: kept out until a broadcast no longer names them.
        self._dead: set[str] = set()
        self.metrics = RouterMetrics(_router_name())
        self.admission = AdmissionQueue.from_config(
            self.router_config.queue,
            on_wait=self.metrics.observe_wait,
            on_length=self.metrics.set_queue_length,
            on_reject=self.metrics.rejected,
        )

    # Routing tasks parked on the admission queue only await a future: let one run per
    # waiting request (up to the queue's length), not Serve's 2 x replicas.
    @property
    def max_num_routing_tasks(self) -> int:
        admission = getattr(self, "admission", None)
        return 2 * len(self._replicas) + (admission.max_len if admission is not None else 0)

    def _notify(self) -> None:
        try:
            self.admission.notify()
        except Exception:
            logger.exception("rayfleet router: admission queue notify failed")

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        if self._dead:
            self._dead &= {r.replica_id.unique_id for r in replicas}
            replicas = [r for r in replicas if r.replica_id.unique_id not in self._dead]
        super().update_replicas(replicas)
        changed = False
        present = []
        for r in replicas:
            rid = r.replica_id.unique_id
            present.append(rid)
            try:
                changed |= self.core.update(rid, r.routing_stats, r.max_ongoing_requests)
            except Exception:
                logger.exception("rayfleet router: bad routing stats from %s", rid)
        self.core.sync(present)
        self.metrics.set_model_name(self.core.model_name)
        if changed or replicas:
            self._notify()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._dead.add(replica_id.unique_id)
        self.core.remove(replica_id.unique_id)
        self._notify()

    def debug_state(self) -> dict[str, Any]:
        """This router's view as plain data (`Ingress.router_debug`, tests): per replica, the
        prefix blocks indexed for it and its load; replicas seen dead; the queue's length."""
        index = self.core.index
        return {
            "replicas": {
                rid: {
                    "indexed_blocks": index.num_blocks(rid) if index is not None else 0,
                    "report": rep.report,
                    **dataclasses.asdict(rep.load),
                }
                for rid, rep in self.core.replicas.items()
            },
            "serve_replicas": sorted(r.replica_id.unique_id for r in self._replicas_list),
            "dead": sorted(self._dead),
            "queue_len": len(self.admission),
        }

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.core.complete(replica_id.unique_id, internal_request_id)
        self._notify()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # If the chosen replicas refuse (max_ongoing_requests), back off before retrying.
            pending_request.routing_context.should_backoff = True
        hint = route_hint_of(pending_request)
        if hint is None:  # not a generate call: Serve's queue-length choice among all
            return [candidate_replicas]
        request_id = pending_request.metadata.internal_request_id

        def try_place() -> str | None:
            return self.core.place(
                (r.replica_id.unique_id for r in self._replicas_list), hint, request_id
            )

        try:
            rid = await self.admission.wait(
                try_place,
                hint.priority,
                release=lambda _: self.core.release(request_id),
            )
        except QueueFull as e:
            fut = pending_request.future
            if not fut.done():
                fut.set_exception(e)  # Serve raises it from the handle call
            # A non-empty rank makes Serve's routing loop look at the (now done) future.
            return [candidate_replicas[:1]] if candidate_replicas else []
        for r in self._replicas_list:
            if r.replica_id.unique_id == rid:
                return [[r]]
        self.core.release(request_id)  # the replica left meanwhile: choose again
        return []


async def router_debug_of(handle: Any) -> dict[str, Any] | None:
    """`debug_state()` of the KVAwareRequestRouter behind a DeploymentHandle of this process
    (None under Serve's own router, or before the handle sent anything). Reaches into Serve's
    internals (`handle._router._asyncio_router._request_router`, ray 2.60) and reads the
    state on the router's own event loop."""
    router = getattr(handle, "_router", None)
    rr = getattr(getattr(router, "_asyncio_router", None), "_request_router", None)
    # Duck-typed: Serve builds the router from its own copy of this class (the class object
    # differs from the one imported here, so isinstance fails).
    if not callable(getattr(rr, "debug_state", None)):
        return None
    loop = getattr(router, "_asyncio_loop", None)
    if loop is None or loop is asyncio.get_running_loop():
        return rr.debug_state()

    async def read() -> dict[str, Any]:
        return rr.debug_state()

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read(), loop))


__all__ = [
    "KVAwareRequestRouter",
    "KVRouterCore",
    "ROUTER_CLASS_PATH",
    "RouteHint",
    "RoutingStatsReporter",
    "route_hint_of",
    "router_debug_of",
]
