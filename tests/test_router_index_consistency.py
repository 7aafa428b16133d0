"""The router's prefix index agrees with the engines' real prefix caches, evictions included.

Ray-free: a real `LLMEngine` (a tiny random Llama, the default model's tokenizer) runs a
random workload in a KV pool far too small for it, so blocks are evicted (LRU), requests are
preempted and aborted; its reports go through `RoutingStatsReporter` -> `KVRouterCore`, and
after every report the router applies, the index holds exactly the engine's cached hashes.

With the `ray` marker: two real replicas of the default model with small KV pools, distinct
long prompts through a `DeploymentHandle`; once the replicas are idle and the router has
applied their events up to the engines' last batch, each replica's index entry equals its
engine's cached blocks (`LLMServer.kv_cache_contents`). On the same cluster, the admission
queue (Serve's own bound off) refuses a request when full. Run them with
`pytest -m ray tests/test_router_index_consistency.py`.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from rayfleet.cluster.kv_router import KVRouterCore, RouteHint, RoutingStatsReporter
from rayfleet.cluster.router_config import RouterConfig
from rayfleet.engine import (
    BlockRemoved,
    EngineConfig,
    LLMEngine,
    SamplingParams,
    hash_prompt_blocks,
)

VOCAB = 384  # conftest's tiny models


def _router() -> KVRouterCore:
    return KVRouterCore(RouterConfig(seed=0, pending_placement_ttl_s=None))


def _evicted(engine: LLMEngine) -> int:
    """Block hashes the engine evicted so far (its whole event log is still buffered)."""
    return sum(
        len(e.block_hashes)
        for b in engine.kv.events.take(-1)
        for e in b.events
        if isinstance(e, BlockRemoved)
    )


def _tiny_engine(tiny_model_factory, tokenizer_dir, **engine_kw) -> LLMEngine:
    """An engine on the tiny random Llama, float32 on the CPU, with 4-token blocks."""
    folder = tiny_model_factory("tiny")
    config = EngineConfig(
        model=str(folder),
        tokenizer=tokenizer_dir,
        device="cpu",
        dtype="float32",
        block_size=4,
        **engine_kw,
    )
    return LLMEngine(config)


@pytest.mark.parametrize("mode,seed", [("recompute", 0), ("swap", 1)])
def test_the_index_equals_a_real_engines_cache_after_every_report_despite_evictions(
    tiny_model_factory, default_model_dir, mode, seed
):
    engine = _tiny_engine(
        tiny_model_factory,
        default_model_dir,
        num_kv_blocks=20,  # 80 tokens for up to 3 requests of up to 50: evictions
        max_num_seqs=3,
        max_num_batched_tokens=16,
        preemption_mode=mode,
        swap_space_bytes=1 << 20,
    )
    rng = random.Random(seed)
    window = 4
    reporter = RoutingStatsReporter(engine, 3, window_reports=window, snapshot_every=1000)
    router = _router()
    router.update("x", reporter.report(), None)
    shared = [rng.randrange(3, VOCAB) for _ in range(12)]  # a prefix some prompts share
    skipped = 0
    applied = 0
    next_id = 0
    for step in range(160):
        if rng.random() < 0.35 and len(engine.scheduler.requests) < 5:
            own = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 30))]
            prompt = (shared + own) if rng.random() < 0.4 else own
            params = SamplingParams(max_tokens=rng.randint(1, 8), ignore_eos=True, temperature=0)
            engine.add_request(f"r{next_id}", prompt, params)
            next_id += 1
        if engine.outputs.states and rng.random() < 0.04:
            engine.abort_request(rng.choice(sorted(engine.outputs.states)))
        if step == 100:  # drain, then clear the cache outside a step
            while engine.has_unfinished_requests():
                engine.step()
            assert engine.reset_prefix_cache()
        if engine.has_unfinished_requests():
            engine.step()
        if step == 100 or rng.random() < 0.5:
            report = reporter.report()
            # The router may miss reports (Serve's long poll keeps only the latest); fewer
            # than `window` in a row are covered by the window of batches each one carries.
            if step != 100 and skipped < window - 1 and rng.random() < 0.3:
                skipped += 1
                continue
            skipped = 0
            assert router.update("x", report, None)
            assert router.index.blocks("x") == engine.kv.pool.cached_hashes(), step
            applied += 1
    assert applied > 40
    assert _evicted(engine) > 20  # the run did evict
    assert engine.get_stats().num_preemptions > 0


def test_after_a_missed_window_the_index_catches_up_at_the_next_snapshot(
    tiny_model_factory, default_model_dir
):
    """A router that missed more reports than the window holds keeps its older view until
    the next report that carries a snapshot (that lag is by design), then agrees again."""
    engine = _tiny_engine(
        tiny_model_factory, default_model_dir, num_kv_blocks=12, max_num_batched_tokens=64
    )
    reporter = RoutingStatsReporter(engine, 8, window_reports=2, snapshot_every=6)
    router = _router()
    router.update("x", reporter.report(), None)  # report 1: a snapshot
    rng = random.Random(3)
    for i in range(4):  # reports 2..5 each cover one request; the router sees none
        prompt = [rng.randrange(3, VOCAB) for _ in range(20)]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        reporter.report()
    assert _evicted(engine) > 0
    engine.add_request("last", [rng.randrange(3, VOCAB) for _ in range(20)], SamplingParams())
    engine.step()
    r6 = reporter.report()  # a gap for this router, and no snapshot... until report 7
    router.update("x", r6, None)
    assert router.index.blocks("x") != engine.kv.pool.cached_hashes()
    r7 = reporter.report()
    assert r7["kv_snapshot"] is not None
    router.update("x", r7, None)
    assert router.index.blocks("x") == engine.kv.pool.cached_hashes()


# ---- through a real cluster ------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_cluster():
    """A local Ray cluster with Serve, in a loopback-only network namespace."""
    from rayfleet.cluster.testing import local_serve_cluster

    with local_serve_cluster(prefix="rfix", skip=pytest.skip):
        yield


def _deploy(name: str, config: dict):
    """Only the LLMServer deployment (no ingress), with rayfleet's router; its handle."""
    from ray import serve
    from rayfleet.cluster.app import llm_deployment_options
    from rayfleet.cluster.config import parse_config
    from rayfleet.cluster.llm_server import LLMServer
    from rayfleet.engine import default_model_path

    cfg = parse_config({"model": {"path": default_model_path()}, **config})
    dep = serve.deployment(LLMServer, name="LLMServer").options(**llm_deployment_options(cfg))
    return serve.run(dep.bind(cfg.to_args()), name=name, route_prefix=None), cfg


def _request(rid: str, ids: list[int], block_size: int, max_tokens: int):
    from rayfleet.cluster.llm_server import GenerateRequest

    hint = RouteHint(tuple(hash_prompt_blocks(ids, block_size)), len(ids))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return GenerateRequest(rid, ids, params, route=hint)


@pytest.mark.ray
def test_two_real_replicas_index_matches_their_caches_after_evictions(serve_cluster):
    from ray import serve

    handle, cfg = _deploy(
        "kvix",
        {
            "engine": {
                "device": "cpu",
                "dtype": "float32",
                "num_kv_blocks": 40,  # 640 tokens: 3 prompts of 13 blocks
                "max_model_len": 512,
                "max_num_seqs": 4,
            },
            "replica": {"num_replicas": 2, "resources": {"num_cpus": 1}},
            "router": {"pending_placement_ttl_s": 0.05},
        },
    )
    try:
        bs = cfg.engine.block_size
        rng = random.Random(0)

        async def run_workload() -> None:
            gen = handle.options(method_name="generate", stream=True)

            async def one(i: int) -> None:
                ids = [rng.randrange(100, 40000) for _ in range(200)]  # 12 full blocks
                async for d in gen.remote(_request(f"ix{i}", ids, bs, 2)):
                    assert d.error is None, d.error

            # 16 distinct prompts (192 blocks) into 2 x 40 blocks, 4 at a time.
            for k in range(0, 16, 4):
                await asyncio.gather(*(one(i) for i in range(k, k + 4)))

        asyncio.run(run_workload())

        contents = _contents_of_every_replica(handle, 2)
        index = _on_router_loop(handle, lambda r: r.core.index)
        assert set(contents) == set(_on_router_loop(handle, lambda r: list(r.core.replicas)))
        deadline = time.monotonic() + 30
        while True:  # until the router applied each engine's events up to its last
            seqs = _on_router_loop(handle, lambda r: {x: index.last_seq(x) for x in contents})
            behind = {x: (seqs[x], c["seq"]) for x, c in contents.items() if seqs[x] < c["seq"]}
            if not behind or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert not behind, behind
        for rid, c in contents.items():
            cached = frozenset(c["block_hashes"])
            assert 0 < len(cached) <= 40  # both replicas took requests
            assert _on_router_loop(handle, lambda r, x=rid: index.blocks(x)) == cached, rid
        # 16 x 12 distinct blocks went through 2 x 40: most were evicted.
        assert sum(len(c["block_hashes"]) for c in contents.values()) <= 80
    finally:
        serve.delete("kvix")


@pytest.mark.ray
def test_a_full_admission_queue_refuses_through_real_serve(serve_cluster):
    """Serve's own queue bound is off by default: the admission queue (max_len 1) refuses
    the third request while the only replica (1 request at a time) is busy."""
    from ray import serve
    from rayfleet.cluster.routing_policy import QueueFull

    handle, cfg = _deploy(
        "kvq",
        {
            "engine": {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64},
            "replica": {"num_replicas": 1, "max_ongoing_requests": 1},
            "router": {"queue": {"max_len": 1}},
        },
    )
    try:
        bs = cfg.engine.block_size
        gen = handle.options(method_name="generate", stream=True)

        async def main():
            first = gen.remote(_request("q1", list(range(200, 232)), bs, 150))
            await first.__anext__()  # running on the replica
            second = asyncio.ensure_future(
                _drain(gen.remote(_request("q2", list(range(300, 332)), bs, 2)))
            )
            await asyncio.sleep(1.0)  # parked in the admission queue
            t0 = time.monotonic()
            with pytest.raises(QueueFull):
                await _drain(gen.remote(_request("q3", list(range(400, 432)), bs, 2)))
            refused_after = time.monotonic() - t0
            state = _on_router_loop(
                handle,
                lambda r: (len(r.admission), r.admission.rejected_total, r.metrics._length),
            )
            await _drain(first)
            await asyncio.wait_for(second, 120)  # binds once the first finished
            return refused_after, state

        refused_after, (queued, rejected, gauge) = asyncio.run(main())
        assert refused_after < 10  # refused at once, not after the first request finished
        assert (queued, rejected, gauge) == (1, 1, 1)
    finally:
        serve.delete("kvq")


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def _contents_of_every_replica(handle, n: int, tries: int = 60) -> dict:
    """`kv_cache_contents` of each of the `n` replicas (calls without a route hint go to
    Serve's own choice among the replicas: ask until each has answered)."""
    out: dict = {}
    h = handle.options(method_name="kv_cache_contents")
    for _ in range(tries):
        for r in [h.remote() for _ in range(4)]:
            c = r.result(timeout_s=60)
            out[c["replica"]] = c
        if len(out) >= n:
            return out
    raise AssertionError(f"only {sorted(out)} of {n} replicas answered")


def _on_router_loop(handle, fn):
    """`fn(router)` on the handle's request router, in the router's own event loop thread
    (the driver's handle runs it in a separate loop; its state is not thread-safe)."""
    wrapper = handle._router._asyncio_router
    router = wrapper.request_router

    async def call():
        return fn(router)

    return asyncio.run_coroutine_threadsafe(call(), wrapper._event_loop).result(10)
