"""Routing policies: the kv-aware cost, the hot-prefix load bound, capacity, baselines."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from rayfleet.cluster.prefix_index import ApproximatePrefixIndex, PrefixIndex
from rayfleet.cluster.router_config import CostWeights, RouterConfig
from rayfleet.cluster.routing_policy import (
    KVAwarePolicy,
    PowerOfTwoPolicy,
    ReplicaLoad,
    RoundRobinPolicy,
    blocks_needed,
    build_policy,
    has_capacity,
)
from rayfleet.engine import KVEventBatch, KVSnapshot, hash_prompt_blocks
from rayfleet.engine.kv_events import BlockStored

BS = 16
TOKENS = list(range(1000, 1000 + 10 * BS))  # 10 full blocks
PROMPT = hash_prompt_blocks(TOKENS, BS)
N = len(TOKENS)


def load(rid: str, **kw) -> ReplicaLoad:
    base = dict(num_free_blocks=1000, num_total_blocks=1000, max_num_seqs=64, block_size=BS)
    base.update(kw)
    return ReplicaLoad(replica_id=rid, **base)


def index_with(**cached_blocks: int) -> PrefixIndex:
    """An index where replica r caches the prompt's first cached_blocks[r] blocks."""
    index = PrefixIndex()
    for rid, n in cached_blocks.items():
        index.resync(rid, KVSnapshot("e", 0, frozenset()))
        index.apply_batch(rid, KVEventBatch("e", 1, 0.0, (BlockStored(tuple(PROMPT[:n]), None),)))
    return index


def kv(
    index: PrefixIndex, eps: float | None = 0.5, seed: int = 0, slack: int = 2, **weights
) -> KVAwarePolicy:
    return KVAwarePolicy(
        index, CostWeights(**weights), eps, random.Random(seed), load_bound_slack=slack
    )


# ---- the cost --------------------------------------------------------------------------
def test_cost_is_the_documented_weighted_sum():
    w = CostWeights(
        prefill_token=2.0,
        queued_prefill_token=1.5,
        running_request=3.0,
        waiting_request=5.0,
        kv_usage=100.0,
    )
    x = load(
        "a",
        num_running=4,
        num_waiting=2,
        inflight=1,
        queued_prefill_tokens=300,
        inflight_prefill_tokens=20,
        num_free_blocks=750,
    )
    policy = KVAwarePolicy(index_with(a=6), w)
    cost, cached = policy.costs([x], PROMPT, N)["a"]
    assert cached == 6
    uncached = N - 6 * BS
    assert cost == pytest.approx(
        2.0 * uncached + 1.5 * (300 + 20) + 3.0 * 4 + 5.0 * (2 + 1) + 100.0 * 0.25
    )


def test_a_fully_cached_prompt_still_computes_its_last_token():
    policy = KVAwarePolicy(index_with(a=10), CostWeights(kv_usage=0))
    assert policy.costs([load("a")], PROMPT, N)["a"] == (2.0 * 1, 10)


def test_the_longest_cached_prefix_wins_when_loads_are_equal():
    policy = kv(index_with(a=2, b=8, c=5))
    loads = [load("a"), load("b", queued_prefill_tokens=7, num_free_blocks=500), load("c")]
    placed = policy.choose(loads, PROMPT, N)
    assert placed.replica_id == "b" and placed.cached_blocks == 8 and not placed.spilled
    assert placed.cost == pytest.approx(policy.costs(loads, PROMPT, N)["b"][0])


def test_a_cached_prefix_loses_to_an_idle_replica_when_its_queue_costs_more():
    policy = kv(index_with(a=10))
    busy = load("a", queued_prefill_tokens=5000, num_waiting=4)
    assert policy.choose([busy, load("b")], PROMPT, N).replica_id == "b"


def test_ties_break_at_random_and_the_rng_is_injectable():
    policy_loads = [load("a"), load("b"), load("c")]
    picks = {
        kv(PrefixIndex(), seed=s).choose(policy_loads, PROMPT, N).replica_id for s in range(40)
    }
    assert picks == {"a", "b", "c"}
    again = [kv(PrefixIndex(), seed=7).choose(policy_loads, PROMPT, N).replica_id for _ in range(3)]
    assert len(set(again)) == 1


# ---- the hot-prefix load bound ---------------------------------------------------------
def test_a_replica_past_the_load_bound_is_passed_over_despite_the_longest_match():
    # Loads 9, 1, 1, 1: total 12, bound ceil(1.5 * 13 / 4) = 5, so "a" is out.
    loads = [load("a", num_running=9), load("b", num_running=1), load("c", num_running=1)]
    loads.append(load("d", num_running=1))
    policy = kv(index_with(a=10), eps=0.5, slack=0, running_request=0.0)
    assert policy.load_bound(loads) == 5
    placed = policy.choose(loads, PROMPT, N)
    assert placed.replica_id != "a" and placed.spilled


def test_at_low_load_the_slack_keeps_a_prefix_where_it_is_cached():
    # 3 replicas, loads 2, 1, 0: m = 4 / 3. The relative term alone (ceil(1.5 m) = 2) would
    # turn "a" away and re-prefill the whole prompt elsewhere; with slack 2 the bound is
    # ceil(m) + 2 = 4 and "a" keeps it.
    loads = [load("a", num_running=2), load("b", num_running=1), load("c")]
    tight = kv(index_with(a=10), eps=0.5, slack=0, running_request=0.0)
    assert tight.load_bound(loads) == 2
    placed = tight.choose(loads, PROMPT, N)
    assert placed.replica_id != "a" and placed.spilled
    slack = kv(index_with(a=10), eps=0.5, slack=2, running_request=0.0)
    assert slack.load_bound(loads) == 4
    placed = slack.choose(loads, PROMPT, N)
    assert placed.replica_id == "a" and not placed.spilled


def test_at_high_load_the_relative_term_rules_and_the_slack_changes_nothing():
    # Loads 20, 6, 6, 6: m = 39 / 4; ceil(1.5 m) = 15 > ceil(m) + 2 = 12.
    loads = [load("a", num_running=20)] + [load(r, num_running=6) for r in "bcd"]
    for slack in (0, 2):
        policy = kv(index_with(a=10), eps=0.5, slack=slack, running_request=0.0)
        assert policy.load_bound(loads) == 15
        assert policy.choose(loads, PROMPT, N).replica_id != "a"


def test_a_negative_slack_is_refused():
    with pytest.raises(ValueError, match="load_bound_slack"):
        kv(PrefixIndex(), slack=-1)
    with pytest.raises(ValidationError, match="load_bound_slack"):
        RouterConfig.model_validate({"load_bound_slack": -1})
    with pytest.raises(ValueError, match="hot_prefix_window"):
        KVAwarePolicy(PrefixIndex(), hot_prefix_window=-1)


def _seen(policy: KVAwarePolicy, hot: int, other: int) -> None:
    """Record `hot` placements of PROMPT's prefix and `other` of unrelated prompts."""
    for _ in range(hot):
        policy.on_placed("a", PROMPT)
    for i in range(other):
        policy.on_placed("a", hash_prompt_blocks([7000 + i] * BS, BS))


def test_a_hot_prefix_held_by_too_few_replicas_goes_to_a_less_loaded_one():
    # All recent placements led with PROMPT's prefix: 3 replicas should hold it, 1 does.
    # "a" (load 2) is within the bound (slack), and cheaper than a miss anywhere else.
    loads = [load("a", num_running=2), load("b", num_running=1), load("c")]
    policy = kv(index_with(a=10), eps=0.5, slack=2, running_request=0.0)
    _seen(policy, 32, 0)
    placed = policy.choose(loads, PROMPT, N)
    assert placed.replica_id == "c" and placed.spilled
    # With the replication off the cache wins.
    off = KVAwarePolicy(index_with(a=10), CostWeights(running_request=0.0), 0.5,
                        random.Random(0), load_bound_slack=2, hot_prefix_window=0)  # fmt: skip
    assert off.choose(loads, PROMPT, N).replica_id == "a"


def test_a_hot_prefix_on_an_idle_fleet_stays_where_it_is_cached():
    loads = [load("a"), load("b"), load("c")]
    policy = kv(index_with(a=10), eps=0.5, slack=2, running_request=0.0)
    _seen(policy, 32, 0)
    assert policy.choose(loads, PROMPT, N).replica_id == "a"


def test_a_prefix_with_a_small_share_is_not_replicated():
    # 4 of 64 placements (1/16) want ceil(3/16) = 1 holder: "a" already is.
    loads = [load("a", num_running=2), load("b"), load("c")]
    policy = kv(index_with(a=10), eps=0.5, slack=2, running_request=0.0)
    _seen(policy, 4, 60)
    assert policy.choose(loads, PROMPT, N).replica_id == "a"
    # Two holders of a prefix with share 0.5 of 3 replicas: enough (ceil(1.5) = 2).
    policy = kv(index_with(a=10, b=10), eps=0.5, slack=2, running_request=0.0)
    _seen(policy, 32, 32)
    loads = [load("a", num_running=2), load("b", num_running=2), load("c")]
    assert policy.choose(loads, PROMPT, N).replica_id in ("a", "b")


def test_without_a_bound_the_hot_replica_keeps_the_request():
    loads = [load("a", num_running=9), load("b", num_running=1), load("c", num_running=1)]
    policy = kv(index_with(a=10), eps=None, running_request=0.0)
    assert policy.choose(loads, PROMPT, N).replica_id == "a"


def test_in_flight_requests_count_toward_the_bound():
    loads = [load("a", inflight=9), load("b"), load("c"), load("d")]
    policy = kv(index_with(a=10), eps=0.5, waiting_request=0.0)
    assert policy.choose(loads, PROMPT, N).replica_id != "a"


def test_when_every_replica_with_room_is_past_the_bound_the_cheapest_still_wins():
    # "a" has no free blocks; "b" is over the bound (10 >= ceil(11 / 2)) but has room.
    loads = [load("a", num_free_blocks=0), load("b", num_running=10)]
    policy = kv(PrefixIndex(), eps=0.0, slack=0)
    assert policy.load_bound(loads) == 6
    placed = policy.choose(loads, PROMPT, N)
    assert placed.replica_id == "b" and not placed.spilled


# ---- capacity --------------------------------------------------------------------------
def test_has_capacity_checks_the_running_cap_and_free_blocks():
    assert has_capacity(load("a", num_running=3, max_num_seqs=4), 10)
    assert not has_capacity(load("a", num_running=3, num_waiting=1, max_num_seqs=4), 10)
    assert not has_capacity(load("a", inflight=4, max_num_seqs=4), 10)
    assert has_capacity(load("a", num_free_blocks=10), 10)
    assert not has_capacity(load("a", num_free_blocks=9), 10)
    # In-flight prompts will take blocks the stats still show free: all their prompt blocks,
    # cached or not (a cached block taken from the free LRU leaves it too).
    assert not has_capacity(load("a", num_free_blocks=10, inflight_prompt_tokens=BS), 10)
    assert has_capacity(load("a", num_free_blocks=10, inflight_prefill_tokens=BS), 10)


def test_blocks_needed_discounts_cached_blocks():
    assert blocks_needed(N, BS) == 10
    assert blocks_needed(N + 1, BS) == 11
    assert blocks_needed(N, BS, cached_blocks=8) == 2


def test_a_replica_with_the_prefix_cached_has_room_where_a_cold_one_does_not():
    loads = [load("a", num_free_blocks=3), load("b", num_free_blocks=3)]
    placed = kv(index_with(a=8)).choose(loads, PROMPT, N)
    assert placed.replica_id == "a"


@pytest.mark.parametrize(
    "make",
    [lambda: kv(PrefixIndex()), lambda: PowerOfTwoPolicy(random.Random(0)), RoundRobinPolicy],
)
def test_no_replica_with_room_means_none_so_the_request_queues(make):
    loads = [load("a", num_running=64, max_num_seqs=64), load("b", num_free_blocks=2)]
    assert make().choose(loads, PROMPT, N) is None
    assert make().choose([], PROMPT, N) is None


def test_kv_aware_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="num_prompt_tokens"):
        kv(PrefixIndex()).choose([load("a")], [], 0)


# ---- baselines -------------------------------------------------------------------------
def test_power_of_two_takes_the_less_loaded_of_its_two_samples():
    loads = [load("a", num_running=5), load("b", num_running=1)]
    for s in range(10):
        assert PowerOfTwoPolicy(random.Random(s)).choose(loads, PROMPT, N).replica_id == "b"


def test_power_of_two_never_picks_a_full_replica():
    loads = [load("a", num_running=64, max_num_seqs=64), load("b", num_running=60)]
    loads.append(load("c", num_running=64, max_num_seqs=64))
    for s in range(10):
        assert PowerOfTwoPolicy(random.Random(s)).choose(loads, PROMPT, N).replica_id == "b"


def test_round_robin_cycles_and_skips_full_replicas():
    rr = RoundRobinPolicy()
    loads = [load("a"), load("b", num_running=64, max_num_seqs=64), load("c")]
    assert [rr.choose(loads, PROMPT, N).replica_id for _ in range(4)] == ["a", "c", "a", "c"]


# ---- config and wiring -----------------------------------------------------------------
def test_build_policy_follows_the_config():
    assert build_policy(RouterConfig(policy="power-of-two")).name == "power-of-two"
    assert build_policy(RouterConfig(policy="round-robin")).name == "round-robin"
    exact = build_policy(RouterConfig())
    assert exact.name == "kv-aware" and isinstance(exact.index, PrefixIndex)
    approx = build_policy(RouterConfig(kv_events=False, approx_blocks_per_replica=7))
    assert isinstance(approx.index, ApproximatePrefixIndex)
    assert approx.index.max_blocks_per_replica == 7


def test_router_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        RouterConfig(polcy="kv-aware")
    with pytest.raises(ValidationError, match="policy"):
        RouterConfig(policy="least-loaded")
    with pytest.raises(ValidationError, match="prefill_token"):
        RouterConfig(weights={"prefill_token": -1})
    with pytest.raises(ValidationError, match="min_retry_after_s"):
        RouterConfig(queue={"min_retry_after_s": 10, "max_retry_after_s": 5})


def test_router_config_loads_from_a_yaml_shaped_dict():
    cfg = RouterConfig.model_validate(
        {"policy": "kv-aware", "load_bound_epsilon": None, "weights": {"running_request": 4}}
    )
    assert cfg.load_bound_epsilon is None and cfg.weights.running_request == 4


def test_approximate_placements_steer_the_next_request():
    policy = build_policy(RouterConfig(kv_events=False, seed=0))
    loads = [load("a"), load("b"), load("c")]
    first = policy.choose(loads, PROMPT, N)
    policy.on_placed(first.replica_id, PROMPT)
    again = policy.choose(loads, PROMPT, N)
    assert again.replica_id == first.replica_id and again.cached_blocks == 10
    policy.on_replica_removed(first.replica_id)
    assert policy.choose(loads, PROMPT, N).cached_blocks == 0


def test_replica_load_from_engine_stats():
    stats = SimpleNamespace(
        num_running=3,
        num_waiting=2,
        num_swapped=1,
        num_free_blocks=50,
        num_total_blocks=200,
        block_size=16,
    )
    x = ReplicaLoad.from_stats("a", stats, max_num_seqs=8, queued_prefill_tokens=123)
    assert (x.num_running, x.num_waiting, x.num_requests) == (3, 3, 6)
    assert x.kv_usage == pytest.approx(0.75) and x.queued_prefill_tokens == 123


def test_pending_placements_count_as_cached_until_their_ttl():
    now = [0.0]
    policy = build_policy(RouterConfig(seed=0, pending_placement_ttl_s=2.0), clock=lambda: now[0])
    loads = [load("a"), load("b"), load("c")]
    first = policy.choose(loads, PROMPT, N)
    assert first.cached_blocks == 0
    policy.on_placed(first.replica_id, PROMPT)  # no KV event from that replica yet
    again = policy.choose(loads, PROMPT, N)
    assert again.replica_id == first.replica_id and again.cached_blocks == 10
    now[0] = 2.5
    assert policy.choose(loads, PROMPT, N).cached_blocks == 0


def test_without_pending_placements_only_kv_events_count():
    policy = build_policy(RouterConfig(seed=0, pending_placement_ttl_s=None))
    loads = [load("a"), load("b")]
    policy.on_placed("a", PROMPT)
    assert policy.choose(loads, PROMPT, N).cached_blocks == 0
