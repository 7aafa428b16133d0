"""The kv-aware request router inside Ray Serve (`rayfleet.cluster.kv_router`).

Most tests drive the Ray-free parts (`KVRouterCore`, `RoutingStatsReporter`) and the
`KVAwareRequestRouter` subclass directly, without a cluster. One test (`ray` marker) starts a
local Ray cluster with two replicas and checks that requests sharing a long prefix land on
the replica that caches it. Run it with `pytest -m ray tests/test_kv_router.py`.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from rayfleet.cluster.kv_router import (
    KVRouterCore,
    RouteHint,
    RoutingStatsReporter,
    route_hint_of,
)
from rayfleet.cluster.router_config import RouterConfig
from rayfleet.cluster.routing_policy import QueueFull
from rayfleet.engine import BlockRemoved, BlockStored, KVEventBatch, KVSnapshot, hash_prompt_blocks

BS = 16
PROMPT = list(range(1000, 1000 + 8 * BS))  # 8 full blocks
HASHES = tuple(hash_prompt_blocks(PROMPT, BS))
HINT = RouteHint(HASHES, len(PROMPT))


def stats(report: int, batches=(), snapshot=None, **kw) -> dict:
    from rayfleet.cluster.testing import routing_report

    fields = {"block_size": BS, "kv_batches": list(batches), "kv_snapshot": snapshot, **kw}
    return routing_report(report, **fields)


def core(**cfg) -> KVRouterCore:
    cfg.setdefault("seed", 0)
    cfg.setdefault("pending_placement_ttl_s", None)  # events only, unless a test wants it
    return KVRouterCore(RouterConfig(**cfg))


def stored(epoch: str, seq: int, hashes) -> KVEventBatch:
    return KVEventBatch(epoch, seq, 0.0, (BlockStored(tuple(hashes), None),))


# ---- KVRouterCore ----------------------------------------------------------------------
def test_a_request_goes_to_the_replica_whose_kv_events_show_its_prefix():
    c = core()
    c.update("a", stats(1, snapshot=KVSnapshot("ea", -1, frozenset())), None)
    c.update("b", stats(1, snapshot=KVSnapshot("eb", -1, frozenset())), None)
    c.update("b", stats(2, [stored("eb", 0, HASHES)]), None)
    for i in range(5):
        assert c.place(["a", "b"], HINT, f"r{i}") == "b"
        c.complete("b", f"r{i}")


def test_in_flight_prefill_counts_only_what_the_chosen_replica_does_not_cache():
    """A request sent to the replica caching its prefix adds only its uncached tokens to that
    replica's prefill queue (so the next request of the prefix is not pushed away by it);
    all its prompt blocks stay reserved."""
    c = core()
    c.update("a", stats(1, snapshot=KVSnapshot("ea", -1, frozenset())), None)
    c.update("b", stats(1, snapshot=KVSnapshot("eb", -1, frozenset())), None)
    c.update("b", stats(2, [stored("eb", 0, HASHES)]), None)
    assert c.place(["a", "b"], HINT, "r1") == "b"
    loads = {x.replica_id: x for x in c.loads(["a", "b"])}
    cached = min(len(HASHES) * BS, len(PROMPT) - 1)
    assert loads["b"].inflight_prefill_tokens == len(PROMPT) - cached
    assert loads["b"].inflight_prompt_tokens == len(PROMPT)
    assert loads["a"].inflight_prefill_tokens == loads["a"].inflight_prompt_tokens == 0


def test_a_gap_in_the_events_resyncs_from_the_next_snapshot():
    c = core()
    c.update("a", stats(1, snapshot=KVSnapshot("ea", -1, frozenset())), None)
    c.update("b", stats(1, snapshot=KVSnapshot("eb", -1, frozenset())), None)
    # Batch 0 of b was missed; batch 1 alone is a gap: nothing applied.
    c.update("b", stats(2, [stored("eb", 1, HASHES[4:])]), None)
    assert c.index.needs_resync("b") and c.index.num_blocks("b") == 0
    # A later report carries a snapshot: b's view is rebuilt from it.
    snap = KVSnapshot("eb", 1, frozenset(HASHES))
    c.update("b", stats(3, [stored("eb", 1, HASHES[4:])], snapshot=snap), None)
    assert not c.index.needs_resync("b")
    assert c.index.match(["a", "b"], HASHES) == {"a": 0, "b": 8}


def test_events_in_a_window_are_applied_once_and_removals_apply():
    c = core()
    c.update("a", stats(1, snapshot=KVSnapshot("ea", -1, frozenset())), None)
    b0 = stored("ea", 0, HASHES)
    b1 = KVEventBatch("ea", 1, 0.0, (BlockRemoved(HASHES[4:]),))
    c.update("a", stats(2, [b0]), None)
    c.update("a", stats(3, [b0, b1]), None)  # the window repeats b0
    assert c.index.match(["a"], HASHES) == {"a": 4}


def test_in_flight_placements_count_until_the_next_report():
    c = core(policy="round-robin")
    c.update("a", stats(1, max_num_seqs=2), None)
    assert c.place(["a"], HINT, "r1") == "a"
    assert c.place(["a"], HINT, "r2") == "a"
    assert c.replicas["a"].load.inflight == 2
    assert c.place(["a"], HINT, "r3") is None  # 2 in flight = max_num_seqs
    c.update("a", stats(2, num_running=2, max_num_seqs=2), None)  # the report sees them
    assert c.replicas["a"].load.inflight == 0
    assert c.place(["a"], HINT, "r3") is None
    c.complete("a", "r1")  # finished since the report: room again
    assert c.place(["a"], HINT, "r3") == "a"


def test_a_retried_request_releases_its_previous_reservation():
    c = core(policy="round-robin")
    c.update("a", stats(1), None)
    c.update("b", stats(1), None)
    c.place(["a", "b"], HINT, "r1")
    c.place(["a", "b"], HINT, "r1")
    assert c.replicas["a"].load.inflight + c.replicas["b"].load.inflight == 1


def test_max_ongoing_requests_caps_the_replica():
    c = core(policy="round-robin")
    c.update("a", stats(1, max_num_seqs=64), 1)
    assert c.replicas["a"].load.max_num_seqs == 1
    assert c.place(["a"], HINT, "r1") == "a"
    assert c.place(["a"], HINT, "r2") is None


def test_a_replica_that_has_not_reported_yet_takes_requests():
    c = core()
    c.update("a", {}, 8)
    assert c.place(["a"], HINT, "r1") == "a"


def test_a_removed_replica_leaves_the_index_and_the_loads():
    c = core()
    c.update("a", stats(1, snapshot=KVSnapshot("ea", -1, frozenset(HASHES))), None)
    c.update("b", stats(1), None)
    c.sync(["b"])
    assert "a" not in c.replicas
    assert c.index.match(None, HASHES) == {"b": 0}


# ---- RoutingStatsReporter --------------------------------------------------------------
@dataclass
class FakeLLMEngine:
    batches: list = field(default_factory=list)
    cached: frozenset = frozenset()
    snapshots: int = 0

    def take_kv_events(self, after_seq=-1):
        return [b for b in self.batches if b.seq > after_seq]

    def kv_snapshot(self):
        self.snapshots += 1
        last = self.batches[-1].seq if self.batches else -1
        return KVSnapshot("e", last, self.cached)


class FakeAsyncEngine:
    def __init__(self):
        self.engine = FakeLLMEngine()

    def take_kv_events(self, after_seq=-1):
        return self.engine.take_kv_events(after_seq)

    def kv_snapshot(self):
        return self.engine.kv_snapshot()

    def get_stats(self):
        return SimpleNamespace(
            num_running=1, num_waiting=2, num_swapped=0, num_free_blocks=50,
            num_total_blocks=64, block_size=BS, prefix_cache_queries=0, prefix_cache_hits=0,
        )  # fmt: skip


def test_reports_carry_a_window_of_batches_and_periodic_snapshots():
    eng = FakeAsyncEngine()
    rep = RoutingStatsReporter(eng, 8, window_reports=2, snapshot_every=3)
    r1 = rep.report()
    assert r1["kv_snapshot"] is not None and r1["kv_batches"] == []
    assert (r1["num_running"], r1["num_waiting"], r1["max_num_seqs"]) == (1, 2, 8)
    eng.engine.batches.append(stored("e", 0, HASHES[:2]))
    r2 = rep.report()  # a new epoch seen: snapshot again
    assert [b[1] for b in r2["kv_batches"]] == [0] and r2["kv_snapshot"] is not None
    eng.engine.batches.append(stored("e", 1, HASHES[2:4]))
    r3 = rep.report()
    assert [b[1] for b in r3["kv_batches"]] == [0, 1] and r3["kv_snapshot"] is None
    r4 = rep.report()  # window of 2 reports: batch 0 fell out; every 3rd report snapshots
    assert [b[1] for b in r4["kv_batches"]] == [1] and r4["kv_snapshot"] is not None
    assert r4["report"] == 4


def test_a_router_that_skips_reports_stays_in_sync_through_the_window():
    eng = FakeAsyncEngine()
    rep = RoutingStatsReporter(eng, 8, window_reports=4, snapshot_every=100)
    c = core()
    c.update("x", rep.report(), None)
    for i in range(3):
        eng.engine.batches.append(stored("e", i, HASHES[2 * i : 2 * i + 2]))
        eng.engine.cached = frozenset(HASHES[: 2 * i + 2])
        last = rep.report()  # the router sees only the last of these
    c.update("x", last, None)
    assert c.index.match(["x"], HASHES) == {"x": 6}


def test_reports_are_plain_data_the_serve_controller_can_unpickle_without_rayfleet():
    eng = FakeAsyncEngine()
    eng.engine.batches.append(stored("e", 0, HASHES))
    eng.engine.cached = frozenset(HASHES)
    r = RoutingStatsReporter(eng, 8).report()
    assert r["kv_snapshot"] is not None and r["kv_batches"]
    assert b"rayfleet" not in pickle.dumps(r)


def test_reporter_without_kv_sends_only_load():
    r = RoutingStatsReporter(FakeAsyncEngine(), 8, kv=False).report()
    assert "kv_batches" not in r and r["num_free_blocks"] == 50


# ---- the RequestRouter subclass, without a cluster -------------------------------------
@dataclass
class FakeReplica:
    replica_id: object
    routing_stats: dict
    max_ongoing_requests: int = 64


def fake_replica(name: str, st: dict) -> FakeReplica:
    from ray.serve.request_router import ReplicaID

    return FakeReplica(ReplicaID(unique_id=name, deployment_id=_dep()), st)


def _dep():
    from ray.serve._private.common import DeploymentID

    return DeploymentID(name="LLMServer", app_name="app")


def make_router(**cfg):
    from ray.serve._private.common import DeploymentHandleSource
    from rayfleet.cluster.kv_router import KVAwareRequestRouter

    r = KVAwareRequestRouter(deployment_id=_dep(), handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(**RouterConfig(seed=0, **cfg).model_dump(mode="json"))
    return r


def set_replicas(router, replicas) -> None:
    # What `update_replicas` does without Serve's bookkeeping (no queue-length probes).
    router._replicas = {r.replica_id: r for r in replicas}
    router._replicas_list = list(replicas)
    for r in replicas:
        router.core.update(r.replica_id.unique_id, r.routing_stats, r.max_ongoing_requests)


def pending(hint: RouteHint | None, method: str = "generate", rid: str = "req-1"):
    from ray.serve.request_router import PendingRequest

    meta = SimpleNamespace(call_method=method, internal_request_id=rid, multiplexed_model_id="")
    greq = SimpleNamespace(route=hint)
    return PendingRequest(args=[greq], kwargs={}, metadata=meta)


def test_route_hint_is_read_from_the_generate_request():
    # PendingRequest makes an asyncio.Future: build it inside a running loop, as Serve does
    # (outside one it depends on which earlier test left an event loop set).
    async def main():
        assert route_hint_of(pending(HINT)) == HINT
        assert route_hint_of(pending(HINT, method="model_info")) is None
        assert route_hint_of(None) is None

    asyncio.run(main())


def test_choose_replicas_ranks_only_the_replica_caching_the_prefix():
    async def main():
        router = make_router()
        a = fake_replica("a", stats(1, snapshot=KVSnapshot("ea", -1, frozenset())))
        b = fake_replica("b", stats(1, snapshot=KVSnapshot("eb", -1, frozenset(HASHES))))
        set_replicas(router, [a, b])
        ranks = await router.choose_replicas([a, b], pending(HINT))
        assert ranks == [[b]]
        # Calls without a hint are left to Serve's own choice among every replica.
        assert await router.choose_replicas([a, b], pending(None, "get_stats")) == [[a, b]]

    asyncio.run(main())


def test_a_full_admission_queue_fails_the_request_with_queue_full():
    async def main():
        router = make_router(queue={"max_len": 0})
        a = fake_replica("a", stats(1, num_running=8, max_num_seqs=8))  # full
        set_replicas(router, [a])
        pr = pending(HINT)
        ranks = await router.choose_replicas([a], pr)
        assert ranks and pr.future.done()
        with pytest.raises(QueueFull) as e:
            pr.future.result()
        assert int(e.value.retry_after_header) >= 1

    asyncio.run(main())


def test_a_queued_request_binds_when_a_report_shows_room():
    async def main():
        router = make_router()
        a = fake_replica("a", stats(1, num_running=8, max_num_seqs=8))
        set_replicas(router, [a])
        task = asyncio.create_task(router.choose_replicas([a], pending(HINT)))
        await asyncio.sleep(0.05)
        assert not task.done() and len(router.admission) == 1
        a.routing_stats = stats(2, num_running=1, max_num_seqs=8)
        router.core.update("a", a.routing_stats, 64)
        router._notify()
        assert await asyncio.wait_for(task, 5) == [[a]]

    asyncio.run(main())


def test_power_of_two_uses_serves_own_router_and_kv_aware_ours():
    from rayfleet.cluster.app import request_router_options
    from rayfleet.cluster.config import RayfleetConfig

    assert request_router_options(RayfleetConfig(router={"policy": "power-of-two"})) == {}
    opts = request_router_options(RayfleetConfig())
    rc = opts["request_router_config"]
    assert rc.request_router_class == "rayfleet.cluster.kv_router:KVAwareRequestRouter"
    assert RouterConfig.model_validate(rc.request_router_kwargs) == RouterConfig()


# ---- through a real cluster ------------------------------------------------------------
@pytest.mark.ray
def test_requests_sharing_a_long_prefix_land_on_the_replica_caching_it():
    import httpx
    from rayfleet.cluster.testing import (
        cpu_replicas_config,
        deploy_app,
        local_serve_cluster,
        request_replicas,
    )

    with local_serve_cluster(prefix="rfkv", skip=pytest.skip) as cluster:
        deploy_app(
            cpu_replicas_config(
                cluster.model_path,
                num_kv_blocks=96,
                # Placement by KV events alone: the overlay of recent placements
                # is forgotten long before the follow-up requests arrive.
                router={"pending_placement_ttl_s": 0.05},
            ),
            "kvr",
        )
        prefix = " ".join(f"item{i}" for i in range(60))  # ~200 tokens: > 8 blocks
        ids = []
        cached = []
        with httpx.Client(timeout=60) as h:
            for i in range(5):
                r = h.post(
                    cluster.base + "/v1/completions",
                    json={
                        "model": "SmolLM2-135M-Instruct",
                        "prompt": f"{prefix} question {i}:",
                        "max_tokens": 2,
                    },
                )
                assert r.status_code == 200, r.text
                body = r.json()
                ids.append(body["id"])
                details = body["usage"].get("prompt_tokens_details") or {}
                cached.append(details.get("cached_tokens", 0))
                time.sleep(1.0)  # several stats reports (0.25 s) carry the events
        replicas = request_replicas(cluster.temp_dir, "kvr", ids)
        assert len(set(replicas)) == 1, replicas
        assert all(c >= 8 * 16 for c in cached[1:]), cached


def test_a_prompt_no_replica_could_ever_hold_is_sent_on_to_be_refused():
    c = core()
    c.update("a", stats(1, num_free_blocks=4, num_total_blocks=4), None)
    assert c.place(["a"], HINT, "r1") == "a"  # 8 blocks > 4: the engine answers 400


def test_the_ingress_hashes_match_a_real_engines_kv_events():
    """The router's view of a replica, built from a real engine's reports, matches the
    block hashes the ingress computes for the same rendered chat."""
    from rayfleet.engine import (
        AsyncLLMEngine,
        EngineConfig,
        SamplingParams,
        apply_chat_template,
        default_model_path,
    )

    async def main():
        engine = AsyncLLMEngine.from_config(
            EngineConfig(
                model=default_model_path(), dtype="float32", device="cpu", num_kv_blocks=64
            )
        )
        try:
            messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}]
            ids = list(apply_chat_template(engine.tokenizer, messages, add_generation_prompt=True))
            rep = RoutingStatsReporter(engine, 8)
            c = core()
            c.update("x", rep.report(), None)
            async for _ in engine.generate(ids, SamplingParams(max_tokens=1), "r1"):
                pass
            c.update("x", rep.report(), None)
            hashes = hash_prompt_blocks(ids, engine.block_size)
            assert len(hashes) >= 4
            assert c.index.match(["x"], hashes) == {"x": len(hashes)}
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_the_router_serve_unpickles_in_another_process_still_reads_the_ingress_hints():
    """Serve ships the router class pickled *by value* (its whole module): classes defined in
    kv_router are copies in the caller's process. RouteHint must not be one of them, or every
    hint fails `isinstance` and kv-aware placement silently falls back to Serve's choice."""
    import subprocess
    import sys

    from ray import cloudpickle

    dump = (
        "import sys\n"
        "from ray.serve.config import RequestRouterConfig\n"
        "from rayfleet.cluster.kv_router import ROUTER_CLASS_PATH\n"
        "c = RequestRouterConfig(request_router_class=ROUTER_CLASS_PATH)\n"
        "sys.stdout.buffer.write(c.get_serialized_request_router_cls())\n"
    )
    blob = subprocess.run([sys.executable, "-c", dump], capture_output=True, check=True).stdout
    from rayfleet.cluster.kv_router import KVAwareRequestRouter

    cls = cloudpickle.loads(blob)
    assert cls is not KVAwareRequestRouter  # a copy, as in every ingress replica
    hint_of = cls.choose_replicas.__globals__["route_hint_of"]

    async def main():
        assert hint_of(pending(HINT)) == HINT

    asyncio.run(main())


def test_a_reservation_outlives_a_report_made_before_the_request_could_arrive():
    """A report covers the placements made more than REPORT_TRANSIT_S before the replica
    made it (its `at`); a newer placement stays counted. Without that, a burst placed while
    a report was on its way looked like an idle replica (the hot prefix piled onto it)."""
    from rayfleet.cluster.kv_router import REPORT_TRANSIT_S
    from rayfleet.cluster.testing import routing_report

    wall = [1000.0]
    core = KVRouterCore(RouterConfig(seed=0), wall_clock=lambda: wall[0])
    core.update("a", routing_report(1, at=990.0), None)
    rid = core.place(["a"], RouteHint((), 32), "r1")
    inflight = lambda: core.loads(["a"])[0].inflight  # noqa: E731

    assert inflight() == 1
    core.update("a", routing_report(2, at=999.0), None)  # made before the placement
    assert inflight() == 1
    core.update("a", routing_report(3, at=1000.0 + REPORT_TRANSIT_S / 2), None)  # in transit
    assert inflight() == 1
    core.update("a", routing_report(4, at=1000.0 + REPORT_TRANSIT_S * 2), None)
    assert rid == "a" and inflight() == 0

    # A replica whose reports carry no `at`: the first report to arrive covers it.
    core.place(["a"], RouteHint((), 32), "r2")
    assert inflight() == 1
    core.update("a", routing_report(5), None)
    assert inflight() == 0


def test_the_replicas_report_says_when_and_counts_what_its_stats_do_not_yet():
    class Engine:
        def load_snapshot(self):
            return SimpleNamespace(
                num_running=1, num_waiting=2, num_swapped=0, num_free_blocks=10,
                num_total_blocks=20, block_size=16, queued_prefill_tokens=40,
                prefix_cache_queries=0, prefix_cache_hits=0,
            ), 3, 96  # fmt: skip

    before = time.time()
    report = RoutingStatsReporter(Engine(), 8, kv=False).report()
    assert before <= report["at"] <= time.time()
    assert (report["num_running"], report["num_waiting"]) == (1, 5)
    assert report["queued_prefill_tokens"] == 136
