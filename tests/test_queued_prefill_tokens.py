"""Queued prefill tokens: the engine reports the prompt tokens it has not computed yet, the
replica's routing stats carry them, and the router's cost weighs them."""

from __future__ import annotations

import pytest
from rayfleet.cluster.kv_router import KVRouterCore, RouteHint, RoutingStatsReporter
from rayfleet.cluster.router_config import RouterConfig
from rayfleet.engine import EngineConfig, LLMEngine, SamplingParams
from rayfleet.engine.scheduler_output import SchedulerOutput


@pytest.fixture
def engine(tiny_model_factory, default_model_dir) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(tiny_model_factory("tiny")),
            tokenizer=default_model_dir,
            device="cpu",
            dtype="float32",
            block_size=4,
            num_kv_blocks=64,
            max_num_batched_tokens=16,  # chunked prefill: 16 tokens a step
            max_num_seqs=4,
        )
    )


def queued(engine: LLMEngine) -> int:
    return engine.get_stats().queued_prefill_tokens


def test_waiting_prompts_and_unfinished_prefills_count_decodes_do_not(engine):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("a", list(range(10, 40)), params)  # 30 tokens
    engine.add_request("b", list(range(50, 60)), params)  # 10 tokens
    assert queued(engine) == 40  # both waiting
    engine.step()  # a: 16 of 30
    assert queued(engine) == 14 + 10
    engine.step()  # a: its last 14 (now decoding); b: 2 of 10
    assert queued(engine) == 8
    engine.step()  # a decodes; b: its last 8
    assert queued(engine) == 0
    engine.abort_request("a")
    engine.abort_request("b")


def test_a_preempted_request_counts_what_it_must_recompute(engine):
    """Recompute-preemption frees its blocks; its full ones stay in the prefix cache, so
    only the rest counts (14 tokens, 3 cached blocks of 4)."""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("a", list(range(10, 22)), params)
    engine.step()
    engine.step()  # prefilled (12), decoding: 14 tokens, nothing queued
    req = engine.scheduler.running[0]
    assert queued(engine) == 0
    engine.scheduler._preempt(req, SchedulerOutput())  # recompute mode: back to waiting
    assert req.num_tokens == 14
    assert queued(engine) == 14 - 3 * 4
    engine.abort_request("a")


def test_routing_stats_carry_them_and_the_cost_weighs_them(engine):
    engine.add_request("a", list(range(10, 110)), SamplingParams(max_tokens=2))
    report = RoutingStatsReporter(engine, 4).report()
    assert report["queued_prefill_tokens"] == 100
    core = KVRouterCore(RouterConfig(seed=0, weights={"queued_prefill_token": 1.5}))
    core.update("busy", report, None)
    core.update("idle", {**report, "queued_prefill_tokens": 0}, None)  # otherwise the same
    loads = {x.replica_id: x for x in core.loads(["busy", "idle"])}
    assert loads["busy"].queued_prefill_tokens == 100
    costs = core.policy.costs(list(loads.values()), (), 32)
    assert costs["busy"][0] - costs["idle"][0] == pytest.approx(1.5 * 100)
    assert core.place(["busy", "idle"], RouteHint((), 32), "r1") == "idle"
    engine.abort_request("a")


def test_a_waiting_request_does_not_count_the_prefix_the_cache_holds(engine):
    """The replica that caches a shared prefix must not look busier for it: a waiting
    request counts only the tokens it will compute (and the lookup counts no query)."""
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    prefix = list(range(10, 26))  # 16 tokens: 4 blocks of 4
    engine.add_request("first", prefix + [90, 91], params)
    while engine.has_unfinished_requests():
        engine.step()
    queries = engine.kv.stats.queries
    engine.add_request("second", prefix + [92, 93, 94], params)  # 19 tokens, 16 cached
    assert queued(engine) == 3
    assert engine.kv.stats.queries == queries
    engine.add_request("other", list(range(200, 219)), params)  # 19 tokens, none cached
    assert queued(engine) == 3 + 19
    engine.abort_request("second")
    engine.abort_request("other")
