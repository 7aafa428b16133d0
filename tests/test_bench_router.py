"""`rayfleet bench router`'s Ray-free parts: the oracle hit rate, the skewed workload, the
fleet's counters from Prometheus text, and the comparison arithmetic and targets."""

from __future__ import annotations

import argparse
import itertools

import pytest
from rayfleet.loadtests.bench_router import (
    CounterReader,
    Oracle,
    add_args,
    app_args,
    block_keys,
    check_targets,
    compare_workload,
    fleet_delta,
    format_comparison,
    oracle_hit_rate,
    parse_replica_counters,
    pool_rounds,
    request_records,
)
from rayfleet.loadtests.metrics import RequestOutcome
from rayfleet.loadtests.workloads import Session, TokenSource, load_tokenizer, skewed_workload

BS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# ---- oracle ----------------------------------------------------------------------------------
def test_block_keys_are_equal_exactly_for_equal_prefixes():
    table: dict = {}
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], BS, table)  # 2 full blocks, 1 token left
    b = block_keys([1, 2, 3, 4, 5, 6, 7, 8], BS, table)
    c = block_keys([0, 2, 3, 4, 5, 6, 7, 8], BS, table)  # first block differs
    assert len(a) == 2 and a == b
    assert c[1] != a[1]  # same tokens, different parent: a different block


def test_oracle_counts_leading_blocks_seen_before_anywhere():
    prefix = toks(100, 8)  # 2 blocks
    prompts = [prefix + toks(200, 4), prefix + toks(300, 4), prefix + toks(400, 4)]  # 12 each
    o = oracle_hit_rate(prompts, BS, num_replicas=3, blocks_per_replica=100)
    # The first computes everything; each later one reuses the 2 prefix blocks (8 tokens).
    assert o.prompt_tokens == 36
    assert o.reusable_tokens == o.oracle_tokens == 16
    assert o.fits and o.reused_blocks == 2
    assert o.hit_rate == pytest.approx(16 / 36)


def test_oracle_leaves_the_last_prompt_token_to_compute():
    """A prompt that is entirely cached still computes its last token: (n - 1) // bs blocks."""
    p = toks(100, 8)
    o = oracle_hit_rate([p, p], BS, 1, 100)
    assert o.oracle_tokens == 4  # one block of the second, not two


def test_oracle_of_prompts_sharing_nothing_is_zero():
    prompts = [toks(1000 * i, 20) for i in range(1, 6)]
    o = oracle_hit_rate(prompts, BS, 2, 8)
    assert o.hit_rate == 0.0 and o.reused_blocks == 0 and o.fits


def test_oracle_reuse_needs_an_identical_chain_not_identical_blocks():
    a = toks(100, 4) + toks(500, 5)
    b = toks(200, 4) + toks(500, 5)  # second block's tokens equal, parents differ
    assert oracle_hit_rate([a, b], BS, 1, 100).oracle_tokens == 0


def test_oracle_with_a_cache_too_small_is_bounded_by_beladys_replacement():
    """Two prefixes of 2 blocks alternate A B A B; a pooled cache of 2 blocks holds one
    prefix, so at most every other request after the first two can hit."""
    pa, pb = toks(100, 8), toks(200, 8)
    prompts = [p + toks(1000 + 10 * i, 1) for i, p in enumerate([pa, pb, pa, pb])]
    unbounded = oracle_hit_rate(prompts, BS, 1, 100)
    assert unbounded.oracle_tokens == 16  # the 3rd and 4th reuse both prefix blocks
    small = oracle_hit_rate(prompts, BS, num_replicas=1, blocks_per_replica=2)
    assert not small.fits and small.reusable_tokens == 16
    assert small.oracle_tokens == 8  # keep one prefix: one of the two hits
    two = oracle_hit_rate(prompts, BS, num_replicas=2, blocks_per_replica=2)
    assert two.fits and two.oracle_tokens == 16  # 4 blocks pooled: both prefixes stay


def test_belady_bound_matches_brute_force_on_small_cases():
    """On tiny traces, the bound equals the best of every possible keep/evict schedule."""
    pa, pb, pc = toks(100, 8), toks(200, 8), toks(300, 4)
    trace = [pa, pb, pc, pa, pc, pb, pa, pc]
    prompts = [p + [9000 + i] for i, p in enumerate(trace)]
    for cap in (1, 2, 3, 4):
        got = oracle_hit_rate(prompts, BS, 1, cap).oracle_tokens
        assert got == _brute_force_hits(prompts, cap) * BS, cap


def _brute_force_hits(prompts: list[list[int]], cap: int) -> int:
    """Max leading-block hits over every cache content sequence (exhaustive, tiny only)."""
    table: dict = {}
    reqs = [block_keys(p, BS, table) for p in prompts]
    hittable = [(len(p) - 1) // BS for p in prompts]
    best: dict[frozenset, int] = {frozenset(): 0}
    for keys, k in zip(reqs, hittable, strict=True):
        nxt: dict[frozenset, int] = {}
        for cache, score in best.items():
            n = 0
            while n < k and keys[n] in cache:
                n += 1
            pool = cache | set(keys)
            for size in range(min(cap, len(pool)) + 1):
                for keep in itertools.combinations(sorted(pool), size):
                    s = frozenset(keep)
                    if nxt.get(s, -1) < score + n:
                        nxt[s] = score + n
        best = nxt
    return max(best.values())


def test_oracle_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="blocks per replica"):
        oracle_hit_rate([[1, 2, 3]], BS, 1, 0)


# ---- skewed workload -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(default_model_dir):
    return load_tokenizer(default_model_dir)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_skewed_workload_has_exact_lengths_and_one_hot_prefix(tok):
    sessions = skewed_workload(TokenSource(tok, seed=3), 20, 48, 16, 8, hot_fraction=0.8)
    assert len(sessions) == 20
    hot = [s for s in sessions if s.meta["hot"]]
    cold = [s for s in sessions if not s.meta["hot"]]
    assert len(hot) == 16 and len(cold) == 4
    ids = {id(s): _ids(tok, s.turns[0].prompt) for s in sessions}
    for s in sessions:
        (turn,) = s.turns
        assert len(ids[id(s)]) == 64 == turn.prompt_len
        assert turn.output_len == 8
    hot_prefix = ids[id(hot[0])][:48]
    assert all(ids[id(s)][:48] == hot_prefix for s in hot)
    assert len({tuple(ids[id(s)][48:]) for s in hot}) == 16  # suffixes of their own
    for s in cold:
        assert ids[id(s)][0] != hot_prefix[0]  # shares not even the first token
        assert s.group is None
    assert all(s.group == 0 for s in hot)


def test_skewed_workload_is_seeded_and_interleaved(tok):
    a = skewed_workload(TokenSource(tok, seed=5), 10, 16, 8, 4)
    b = skewed_workload(TokenSource(tok, seed=5), 10, 16, 8, 4)
    assert [s.turns[0].prompt for s in a] == [s.turns[0].prompt for s in b]
    assert [s.meta["index"] for s in a] != list(range(10))  # shuffled


def test_skewed_workload_rejects_a_bad_fraction(tok):
    with pytest.raises(ValueError, match="hot fraction"):
        skewed_workload(TokenSource(tok, seed=0), 4, 8, 8, 4, hot_fraction=1.5)


# ---- fleet counters --------------------------------------------------------------------------
METRICS_BEFORE = """\
# HELP ray_rayfleet_prefix_cache_queries_total Cumulative prefix cache queries
# TYPE ray_rayfleet_prefix_cache_queries_total counter
ray_rayfleet_prefix_cache_queries_total{Component="core_worker",model_name="m",replica="a"} 100.0
ray_rayfleet_prefix_cache_hits_total{Component="core_worker",model_name="m",replica="a"} 40.0
ray_rayfleet_request_success_total{finished_reason="length",replica="a"} 3.0
"""
METRICS_AFTER = """\
ray_rayfleet_prefix_cache_queries_total{Component="core_worker",model_name="m",replica="a"} 400.0
ray_rayfleet_prefix_cache_hits_total{Component="core_worker",model_name="m",replica="a"} 240.0
ray_rayfleet_prefix_cache_queries_total{Component="core_worker",model_name="m",replica="b"} 100.0
ray_rayfleet_prefix_cache_hits_total{Component="core_worker",model_name="m",replica="b"} 0.0
ray_rayfleet_num_preemptions_total{Component="core_worker",model_name="m",replica="b"} 2.0
"""


def test_replica_counters_are_read_per_replica():
    c = parse_replica_counters(METRICS_AFTER)
    assert c == {
        "a": {"queries": 400.0, "hits": 240.0},
        "b": {"queries": 100.0, "hits": 0.0, "preemptions": 2.0},
    }


def test_fleet_hit_rate_is_summed_hits_over_summed_queries_of_the_deltas():
    d = fleet_delta(parse_replica_counters(METRICS_BEFORE), parse_replica_counters(METRICS_AFTER))
    # a: +300 queries, +200 hits; b (new): +100 queries, 0 hits.
    assert d["queries"] == 400 and d["hits"] == 200 and d["preemptions"] == 2
    assert d["hit_rate"] == pytest.approx(0.5)
    assert d["replica_query_share"] == [0.75, 0.25]


def test_fleet_delta_ignores_replicas_that_did_nothing_or_left():
    before = {"old": {"queries": 50.0, "hits": 5.0}, "a": {"queries": 10.0, "hits": 0.0}}
    after = {"a": {"queries": 10.0, "hits": 0.0}}
    d = fleet_delta(before, after)
    assert d["queries"] == 0 and d["hit_rate"] is None and d["per_replica"] == {}


class ScriptedReader(CounterReader):
    """Counters that catch up one read at a time (as an exporter's would)."""

    def __init__(self, reads):
        super().__init__("metrics", "http://unused")
        self.reads = list(reads)

    def read(self):
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


def test_counter_reader_waits_until_the_deltas_cover_what_the_client_saw():
    before = {"a": {"queries": 10.0, "generation_tokens": 0.0}}
    reads = [
        {"a": {"queries": 10.0, "generation_tokens": 0.0}},
        {"a": {"queries": 60.0, "generation_tokens": 4.0}},
        {"a": {"queries": 110.0, "generation_tokens": 8.0}},
    ]
    after, settled = ScriptedReader(reads).wait(before, 100, timeout_s=5, min_generated=8)
    assert settled and after["a"]["queries"] == 110.0


def test_counter_reader_gives_up_after_the_timeout():
    r = ScriptedReader([{"a": {"queries": 50.0, "generation_tokens": 0.0}}])
    after, settled = r.wait({}, 100, timeout_s=0.0)
    assert not settled and after["a"]["queries"] == 50.0


# ---- comparison and targets ------------------------------------------------------------------
def run(**bench) -> dict:
    hit = bench.pop("hit_rate", None)
    bench.setdefault("failed", 0)
    bench.setdefault("completed", 10)
    return {"bench": bench, "fleet": {"hit_rate": hit}}


ORACLE = Oracle(
    prompt_tokens=1000,
    reusable_tokens=800,
    oracle_tokens=800,
    reused_blocks=10,
    capacity_blocks=100,
    block_size=16,
)


def test_shared_prefix_targets_are_hit_rate_vs_oracle_and_ttft_ratio():
    kv = run(hit_rate=0.76, median_ttft_ms=100.0)
    p2c = run(hit_rate=0.40, median_ttft_ms=250.0)
    t = {r["target"]: r for r in check_targets("shared-prefix", kv, p2c, ORACLE)}
    assert t["hit rate / oracle >= 0.90"]["value"] == pytest.approx(0.95)
    assert t["hit rate / oracle >= 0.90"]["ok"] is True
    assert t["median TTFT power-of-two / kv-aware >= 2"]["value"] == pytest.approx(2.5)
    assert t["median TTFT power-of-two / kv-aware >= 2"]["ok"] is True
    slow = check_targets("shared-prefix", run(hit_rate=0.7, median_ttft_ms=150.0), p2c, ORACLE)
    assert [r["ok"] for r in slow] == [False, False]  # 0.875 of oracle; 1.67x


def test_random_targets_allow_five_percent_worse():
    p2c = run(output_throughput=100.0, median_ttft_ms=200.0)
    ok = check_targets("random", run(output_throughput=95.5, median_ttft_ms=209.0), p2c, None)
    assert [r["ok"] for r in ok] == [True, True]
    bad = check_targets("random", run(output_throughput=94.0, median_ttft_ms=211.0), p2c, None)
    assert [r["ok"] for r in bad] == [False, False]
    better = check_targets("random", run(output_throughput=130.0, median_ttft_ms=100.0), p2c, None)
    assert [r["ok"] for r in better] == [True, True]  # better is never out of bounds


def test_skewed_target_is_p99_ttft_no_worse():
    p2c = run(p99_ttft_ms=1000.0)
    assert check_targets("skewed", run(p99_ttft_ms=1000.0), p2c, None)[0]["ok"] is True
    assert check_targets("skewed", run(p99_ttft_ms=1001.0), p2c, None)[0]["ok"] is False


def test_a_target_without_data_is_not_judged_and_failures_fail_it():
    assert check_targets("skewed", None, run(p99_ttft_ms=5.0), None)[0]["ok"] is None
    t = check_targets("skewed", run(p99_ttft_ms=1.0, failed=2), run(p99_ttft_ms=5.0), None)
    assert t[0]["ok"] is False and "kv-aware" in t[0]["note"]


def test_comparison_ratios_are_against_power_of_two():
    runs = {
        "kv-aware": run(median_ttft_ms=100.0, output_throughput=50.0, hit_rate=0.6),
        "power-of-two": run(median_ttft_ms=400.0, output_throughput=40.0, hit_rate=0.3),
        "round-robin": run(median_ttft_ms=500.0, output_throughput=20.0, hit_rate=0.2),
    }
    c = compare_workload("shared-prefix", runs, ORACLE)
    rows = {r["key"]: r for r in c["rows"]}
    assert rows["median_ttft_ms"]["ratios"] == {"kv-aware": 0.25, "round-robin": 1.25}
    assert rows["output_throughput"]["ratios"]["kv-aware"] == pytest.approx(1.25)
    assert c["oracle_hit_rate"] == pytest.approx(0.8)
    assert c["hit_rate_vs_oracle"]["kv-aware"] == pytest.approx(0.75)
    assert "p99_ttft_ms" not in rows  # no policy reported it
    text = format_comparison("shared-prefix", c, "title")
    assert "0.250x" in text and "oracle hit rate" in text and "[FAIL] hit rate / oracle" in text


def test_each_policy_gets_the_same_fleet_but_its_own_router():
    p = argparse.ArgumentParser()
    add_args(p)
    a = p.parse_args(["--replicas", "2", "--kv-blocks", "64"])
    kv, p2c = app_args(a, "kv-aware", "/m"), app_args(a, "power-of-two", "/m")
    assert kv["router"]["policy"] == "kv-aware" and p2c["router"]["policy"] == "power-of-two"
    kv.pop("router"), p2c.pop("router")
    assert kv == p2c
    assert kv["replica"]["num_replicas"] == 2 and kv["engine"]["num_kv_blocks"] == 64


def test_set_overrides_a_config_field_for_every_policy_but_not_the_policy():
    p = argparse.ArgumentParser()
    add_args(p)
    a = p.parse_args(
        ["--set", "router.stats_poll_interval_s=1.0", "--set", "router.policy=round-robin"]
    )
    for policy in ("kv-aware", "power-of-two"):
        app = app_args(a, policy, "/m")
        assert app["router"]["stats_poll_interval_s"] == 1.0
        assert app["router"]["policy"] == policy and app["router"]["seed"] == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--set", "router.policy"])


def test_the_default_sizes_are_the_issues():
    p = argparse.ArgumentParser()
    add_args(p)
    a = p.parse_args([])
    assert a.rounds == 1
    assert (a.replicas, a.num_groups, a.prompts_per_group) == (3, 16, 8)
    assert (a.prefix_len, a.suffix_len, a.output_len) == (512, 64, 32)
    assert a.policies == ["kv-aware", "power-of-two"] and a.hot_fraction == 0.8


def test_request_records_follow_the_workload_order_and_split_ttft_by_kind():
    sessions = [
        Session([], group=0 if i % 2 else None, meta={"hot": bool(i % 2)}) for i in range(4)
    ]
    # Completion order differs from the workload's; request 2 failed.
    outs = [
        RequestOutcome(True, "bench-3-0", start_time=13.0, ttft=0.4, latency=2.0, replica="r1"),
        RequestOutcome(True, "bench-0-0", start_time=10.0, ttft=3.0, latency=5.0, replica="r2"),
        RequestOutcome(False, "bench-2-0", start_time=12.0),
        RequestOutcome(True, "bench-1-0", start_time=11.0, ttft=0.2, latency=1.0),
    ]
    rec = request_records(outs, sessions)
    assert rec["hot"] == [False, True, False, True]
    assert rec["start_s"] == [0.0, 1.0, 2.0, 3.0]
    assert rec["ttft_ms"] == [3000.0, 200.0, None, 400.0]
    assert rec["replica"] == ["r2", None, None, "r1"]
    runs = {
        "kv-aware": {**run(p99_ttft_ms=1.0), "requests": rec},
        "power-of-two": run(p99_ttft_ms=1.0),
    }
    c = compare_workload("skewed", runs, None)
    kinds = c["ttft_by_kind"]["kv-aware"]
    assert kinds["hot"]["n"] == 2 and kinds["hot"]["median_ms"] == pytest.approx(300.0)
    assert kinds["other"] == {"n": 1, "median_ms": 3000.0, "p99_ms": 3000.0}
    assert c["ttft_by_kind"]["power-of-two"] is None
    assert "TTFT p50/p99, hot (ms)" in format_comparison("skewed", c)


def test_rounds_are_pooled_over_their_requests_and_judged_alone_too():
    def outs(ttfts, t0):
        return [
            RequestOutcome(
                True, f"bench-{i}-0", start_time=t0 + i, ttft=t, latency=t + 1.0,
                prompt_len=10, expected_output_len=4, output_tokens=4,
            )
            for i, t in enumerate(ttfts)
        ]  # fmt: skip

    def round_run(ttfts, hits, queries, share, t0):
        o = outs(ttfts, t0)
        bench = {
            "duration": 10.0,
            "completed": len(o),
            "failed": 0,
            "p99_ttft_ms": max(ttfts) * 1e3,
        }
        fleet = {"hits": hits, "queries": queries, "hit_rate": hits / queries,
                 "replica_query_share": share}  # fmt: skip
        rec = request_records(o, [Session([], meta={"hot": True}) for _ in o])
        return {"bench": bench, "fleet": fleet, "requests": rec}, o

    kv1, o1 = round_run([0.1, 0.2], 50, 100, [0.6, 0.4], 0.0)
    kv2, o2 = round_run([0.3, 0.4], 70, 100, [0.5, 0.5], 100.0)
    kv = pool_rounds([kv1, kv2], o1 + o2)
    assert kv["fleet"]["hit_rate"] == pytest.approx(0.6)
    assert kv["fleet"]["replica_query_share"] == [0.55, 0.45]
    assert kv["bench"]["completed"] == 4 and kv["bench"]["duration"] == 20.0
    assert kv["bench"]["median_ttft_ms"] == pytest.approx(250.0)
    assert kv["requests"]["round"] == [0, 0, 1, 1] and len(kv["rounds"]) == 2
    assert pool_rounds([kv1], o1) is kv1  # one round: the run itself

    p1, q1 = round_run([0.2, 0.3], 50, 100, [0.5, 0.5], 0.0)
    p2, q2 = round_run([0.2, 0.3], 50, 100, [0.5, 0.5], 100.0)
    p2c = pool_rounds([p1, p2], q1 + q2)
    c = compare_workload("skewed", {"kv-aware": kv, "power-of-two": p2c}, None)
    # Pooled: kv-aware's p99 is 0.4 s vs 0.3 s; alone, round 1 passes and round 2 fails.
    assert c["targets"][0]["ok"] is False
    assert [r[0]["ok"] for r in c["round_targets"]] == [True, False]
    assert "round 2 alone: 1.333" in format_comparison("skewed", c)
