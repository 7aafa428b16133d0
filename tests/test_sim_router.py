"""The router simulator: tiny runs of the production policies over simulated replicas."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from rayfleet.cluster.prefix_index import PrefixIndex
from rayfleet.cluster.routing_policy import KVAwarePolicy
from rayfleet.engine import hash_prompt_blocks
from rayfleet.loadtests import sim_router as sim

CM = replace(sim.PRESETS["cpu"], num_blocks=512, max_num_seqs=32)


def shared_prefix(n: int, seed: int = 0) -> list[sim.SimRequest]:
    return sim.make_workload(
        "shared-prefix",
        n,
        prompts_per_replica=0,
        groups_per_replica=2,
        prompts_per_group=6,
        prefix_len=512,
        suffix_len=32,
        output_len=8,
        hot_share=0.0,
        rate=1.5,
        block_size=CM.block_size,
        seed=seed,
    )


def run(policy_name: str, reqs, n: int, epsilon: float | None = 0.5) -> sim.SimResult:
    clock = sim.SimClock()
    policy = sim.make_policy(policy_name, CM, epsilon, seed=0, clock=clock)
    return sim.simulate(reqs, n, policy, CM, workload="test", label=policy_name, clock=clock)


def test_kv_aware_beats_power_of_two_on_hit_rate_for_shared_prefixes():
    reqs = shared_prefix(8)
    kv = run("kv-aware", reqs, 8)
    p2 = run("power-of-two", reqs, 8)
    assert kv.num_requests == p2.num_requests == 96
    assert kv.hit_rate > p2.hit_rate + 0.15
    assert kv.ttft_mean_s < p2.ttft_mean_s  # simulated seconds, not wall-clock


def test_every_request_is_served_under_every_policy():
    reqs = shared_prefix(4, seed=1)
    for name in sim.POLICIES:
        res = run(name, reqs, 4)
        assert sum(r.finish >= 0 for r in reqs) == len(reqs), name
        assert res.throughput_rps > 0


def test_the_routers_index_matches_every_replicas_cache_after_a_run():
    reqs = shared_prefix(4, seed=2)
    policy = KVAwarePolicy(PrefixIndex(), rng=random.Random(0))
    replicas: list[sim.SimReplica] = []
    real_init = sim.SimReplica.__init__

    def spy(self, idx, cm):
        real_init(self, idx, cm)
        replicas.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sim.SimReplica, "__init__", spy)
        sim.simulate(reqs, 4, policy, CM)
    for rep in replicas:
        cached = rep.pool.cached_hashes()
        assert policy.index.num_blocks(rep.idx) == len(cached)
        assert all(rep.idx in policy.index.replicas_holding(h) for h in cached)


def hot_burst() -> list[sim.SimRequest]:
    """One request warms a hot prefix on one replica; then 40 more with it arrive at once."""
    rng = random.Random(0)
    prefix = [rng.randrange(32000) for _ in range(1024)]

    def req(i: int, t: float) -> sim.SimRequest:
        tokens = prefix + [rng.randrange(32000) for _ in range(32)]
        return sim.SimRequest(i, t, len(tokens), 64, hash_prompt_blocks(tokens, 16), 0)

    return [req(0, 0.0)] + [req(i, 10.0 + 0.02 * i) for i in range(1, 41)]


def burst_counts(reqs) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in reqs[1:]:
        counts[r.replica] = counts.get(r.replica, 0) + 1
    return counts


def test_a_hot_prefix_spreads_past_the_load_bound():
    reqs = hot_burst()
    bounded = run("kv-aware", reqs, 4, epsilon=0.5)
    spread = burst_counts(reqs)
    unbounded = run("kv-aware-unbounded", reqs, 4)
    piled = burst_counts(reqs)
    assert bounded.spilled > 0 and unbounded.spilled == 0
    assert len(spread) == 4  # every replica took part of the burst
    # No replica ran past ceil(1.5 * (41 + 1) / 4) = 16 requests of it ...
    assert max(spread.values()) <= 16
    # ... where without the bound the replica holding the prefix took far more.
    assert max(piled.values()) > max(spread.values()) + 4


def test_oracle_hit_rate_counts_compulsory_misses_only_with_a_big_enough_cache():
    reqs = shared_prefix(2)  # 4 groups of 6: each group's first prompt misses
    rate = sim.oracle_hit_rate(reqs, 10**6, CM.block_size)
    per_prompt = (512 // 16) * 16 / (512 + 32)
    assert rate == pytest.approx(per_prompt * 5 / 6)
    assert sim.oracle_hit_rate(reqs, 1, CM.block_size) < rate


def test_the_cli_writes_a_table_json_and_figure(tmp_path, capsys):
    code = sim.main(
        [
            "--workload",
            "shared-prefix",
            "random",
            "--replicas",
            "2",
            "4",
            "--groups-per-replica",
            "1",
            "--prompts-per-group",
            "3",
            "--prompts-per-replica",
            "3",
            "--prefix-len",
            "256",
            "--num-blocks",
            "256",
            "--result-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "kv-aware" in out and "power-of-two" in out and "round-robin" in out
    doc = json.loads((tmp_path / "sim_router.json").read_text())
    assert {r["num_replicas"] for r in doc["results"]} == {2, 4}
    assert {r["workload"] for r in doc["results"]} == {"shared-prefix", "random"}
    assert {r["policy"] for r in doc["results"]} == {"kv-aware", "power-of-two", "round-robin"}
    assert (tmp_path / "sim_router.png").stat().st_size > 0


def test_weight_overrides_reach_the_policy_and_bad_ones_fail():
    args = sim.build_parser().parse_args(
        ["--weight", "running_request=16", "--weight", "kv_usage=0"]
    )
    w = sim.weights_from_args(args)
    assert (w.running_request, w.kv_usage, w.prefill_token) == (16.0, 0.0, 2.0)
    policy = sim.make_policy("kv-aware", sim.PRESETS["cpu"], 0.5, 0, sim.SimClock(), weights=w)
    assert policy.weights == w
    with pytest.raises(SystemExit):
        sim.weights_from_args(sim.build_parser().parse_args(["--weight", "kv_usage"]))
    with pytest.raises(ValueError):  # an unknown weight: the config model refuses it
        sim.weights_from_args(sim.build_parser().parse_args(["--weight", "nope=1"]))
