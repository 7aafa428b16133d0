"""`rayfleet bench` figures from synthetic timestamps, with answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rayfleet.loadtests.metrics import (
    RequestOutcome,
    calculate_metrics,
    compare_with_server,
    parse_prometheus_counters,
    parse_slo,
    peak_concurrency,
    timeline,
)
from rayfleet.loadtests.report import format_compare, format_result
from rayfleet.loadtests.serve_bench import LoadShape, arrival_offsets, result_document

# Request A: sent at 0, first token at 0.1 s, then gaps 20/30/50 ms: 4 tokens, E2EL 0.2 s.
# Request B: sent at 0.05, first token at 0.3 s, one gap of 100 ms: 2 tokens, E2EL 0.4 s.
# Request C: failed with HTTP 500.


def _a() -> RequestOutcome:
    return RequestOutcome(
        success=True,
        start_time=0.0,
        ttft=0.1,
        itl=[0.02, 0.03, 0.05],
        latency=0.2,
        prompt_len=10,
        prompt_tokens=10,
        output_tokens=4,
        chunks=4,
        expected_output_len=4,
    )


def _b() -> RequestOutcome:
    return RequestOutcome(
        success=True,
        start_time=0.05,
        ttft=0.3,
        itl=[0.1],
        latency=0.4,
        prompt_len=20,
        prompt_tokens=20,
        output_tokens=2,
        chunks=2,
        expected_output_len=2,
    )


def _c() -> RequestOutcome:
    return RequestOutcome(
        success=False, start_time=0.1, error="HTTP 500: boom", error_reason="HTTP 500"
    )


def test_counts_and_throughputs_over_the_run_duration():
    m = calculate_metrics([_a(), _b(), _c()], duration_s=1.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(6.0)
    assert m["total_token_throughput"] == pytest.approx(36.0)
    assert m["error_reasons"] == {"HTTP 500": 1}


def test_ttft_e2el_statistics_use_linear_percentiles():
    m = calculate_metrics([_a(), _b()], duration_s=1.0, percentiles=[90, 99])
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)  # 100 + 0.99 * (300 - 100)
    assert m["std_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(300.0)
    assert m["p90_e2el_ms"] == pytest.approx(380.0)


def test_itl_pools_every_gap_of_every_request():
    m = calculate_metrics([_a(), _b()], duration_s=1.0, percentiles=[90])
    # gaps 20, 30, 50, 100 ms
    assert m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p90_itl_ms"] == pytest.approx(85.0)  # rank 2.7: 50 + 0.7 * 50


def test_tpot_is_time_after_first_token_over_remaining_tokens():
    m = calculate_metrics([_a(), _b()], duration_s=1.0)
    # A: (0.2 - 0.1) / 3 ; B: (0.4 - 0.3) / 1
    assert _a().tpot == pytest.approx(0.1 / 3)
    assert m["mean_tpot_ms"] == pytest.approx((100.0 / 3 + 100.0) / 2)


def test_single_token_replies_have_no_tpot_but_count_as_zero_for_goodput():
    one = RequestOutcome(success=True, ttft=0.05, latency=0.05, output_tokens=1, chunks=1)
    m = calculate_metrics([one], duration_s=1.0, slo={"tpot": 1.0})
    assert m["mean_tpot_ms"] == 0.0
    assert m["request_goodput"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        ({"ttft": 150}, 1),
        ({"ttft": 300}, 2),  # the bound is inclusive
        ({"tpot": 50}, 1),
        ({"e2el": 250}, 1),
        ({"ttft": 1000, "tpot": 1000, "e2el": 1000}, 2),
        ({"ttft": 50}, 0),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slo, good):
    m = calculate_metrics([_a(), _b(), _c()], duration_s=2.0, slo=slo)
    assert m["good_requests"] == good
    assert m["request_goodput"] == pytest.approx(good / 2.0)


def test_goodput_is_none_without_slo():
    assert calculate_metrics([_a()], duration_s=1.0)["request_goodput"] is None


def test_output_tokens_come_from_usage_and_are_cross_checked_with_chunks():
    bundled = RequestOutcome(
        success=True, ttft=0.1, itl=[0.1], latency=0.2, output_tokens=5, chunks=2
    )
    no_usage = RequestOutcome(success=True, ttft=0.1, itl=[0.1, 0.1], latency=0.3, chunks=3)
    m = calculate_metrics([bundled, no_usage], duration_s=1.0)
    assert m["total_output_tokens"] == 5 + 3
    assert m["token_count_mismatches"] == 1
    assert m["token_count_source"] == "mixed"
    assert m["total_streamed_chunks"] == 5


def test_prompt_and_output_length_mismatches_are_counted():
    wrong = RequestOutcome(
        success=True,
        ttft=0.1,
        latency=0.1,
        prompt_len=10,
        prompt_tokens=11,
        output_tokens=3,
        chunks=3,
        expected_output_len=4,
    )
    m = calculate_metrics([wrong, _a()], duration_s=1.0)
    assert m["prompt_len_mismatches"] == 1
    assert m["output_len_mismatches"] == 1


def test_all_failed_gives_zero_latencies_not_errors():
    m = calculate_metrics([_c()], duration_s=1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["max_concurrent_requests"] == 0


def test_duration_must_be_positive():
    with pytest.raises(ValueError, match="duration"):
        calculate_metrics([_a()], duration_s=0.0)


def test_peak_concurrency_uses_half_open_intervals():
    assert peak_concurrency([_a(), _b()]) == 2
    back_to_back = [
        RequestOutcome(start_time=0.0, latency=1.0),
        RequestOutcome(start_time=1.0, latency=1.0),
    ]
    assert peak_concurrency(back_to_back) == 1


def test_timeline_buckets_add_up_to_the_output_tokens():
    tl = timeline([_a(), _b()], bucket_s=0.1, t0=0.0)
    assert sum(tl["output_tokens_per_s"]) * 0.1 == pytest.approx(6.0)
    # A's four tokens arrive at 0.10, 0.12, 0.15, 0.20 s; B's at 0.35 and 0.45 s
    assert tl["output_tokens_per_s"][1] == pytest.approx(30.0)
    # request-seconds in flight in [0, 0.1): A for 0.1 s and B for 0.05 s
    assert tl["concurrent_requests"][0] == pytest.approx(1.5)


def test_max_output_tokens_per_s_is_the_busiest_second():
    reqs = [
        RequestOutcome(
            success=True,
            start_time=0.0,
            ttft=0.1,
            itl=[0.1] * 9,
            latency=1.0,
            output_tokens=10,
            chunks=10,
        ),
        RequestOutcome(
            success=True, start_time=1.0, ttft=0.5, itl=[], latency=0.5, output_tokens=1, chunks=1
        ),
    ]
    assert calculate_metrics(reqs, duration_s=2.0)["max_output_tokens_per_s"] == pytest.approx(10.0)


def test_parse_slo_accepts_name_ms_pairs():
    assert parse_slo(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    assert parse_slo(["ttft:1 e2el:2"]) == {"ttft": 1.0, "e2el": 2.0}
    assert parse_slo(None) == {}


@pytest.mark.parametrize("bad", ["itl:5", "ttft", "ttft:abc", "tpot:-1"])
def test_parse_slo_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        parse_slo([bad])


def test_prometheus_counters_are_summed_over_labels_under_known_prefixes():
    text = """# HELP rayfleet:request_success_total done
# TYPE rayfleet:request_success_total counter
rayfleet:request_success_total{finished_reason="length",model_name="a b"} 3.0
rayfleet:request_success_total{finished_reason="stop"} 2
rayfleet:cached_prompt_tokens_total 99
ray_rayfleet_prompt_tokens_total{x="1"} 10 1700000000
vllm:generation_tokens_total 7e1
"""
    assert parse_prometheus_counters(text) == {
        "request_success": 5.0,
        "prompt_tokens": 10.0,
        "generation_tokens": 70.0,
    }


def test_server_check_compares_client_and_server_counts():
    res = {"completed": 2, "total_input_tokens": 30, "total_output_tokens": 6}
    check = compare_with_server(
        res, {"request_success": 2, "prompt_tokens": 30, "generation_tokens": 7}
    )
    assert check["request_success"]["agree"] and check["prompt_tokens"]["agree"]
    assert not check["generation_tokens"]["agree"]


def test_server_prompt_tokens_may_exclude_prefix_cache_hits():
    res = {"completed": 2, "total_input_tokens": 30, "total_output_tokens": 6}
    deltas = {"prompt_tokens": 18, "prefix_cache_hits": 12, "generation_tokens": 6}
    check = compare_with_server(res, deltas)
    assert check["prompt_tokens"]["agree"] and "prefix cache hits" in check["prompt_tokens"]["note"]


def test_infinite_rate_sends_everything_at_once():
    assert list(arrival_offsets(LoadShape(num_sessions=5))) == [0.0] * 5


def test_poisson_arrivals_are_seeded_and_end_at_count_over_rate():
    shape = LoadShape(request_rate=10.0, num_sessions=2000, seed=3)
    a = np.array(list(arrival_offsets(shape)))
    assert a[-1] == pytest.approx(200.0)
    assert np.all(np.diff(a) >= 0)
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: CV 1
    assert list(arrival_offsets(shape)) == list(a)


def test_burstiness_sets_the_spread_of_the_gaps():
    cv = {}
    for k in (0.25, 4.0):
        a = np.array(
            list(arrival_offsets(LoadShape(request_rate=5.0, burstiness=k, num_sessions=4000)))
        )
        gaps = np.diff(a)
        cv[k] = gaps.std() / gaps.mean()
    assert cv[0.25] == pytest.approx(2.0, rel=0.15)  # gamma: CV = 1/sqrt(k)
    assert cv[4.0] == pytest.approx(0.5, rel=0.15)


def test_unbounded_arrivals_keep_the_mean_rate():
    gen = arrival_offsets(LoadShape(request_rate=20.0, num_sessions=None, duration_s=1.0))
    a = [next(gen) for _ in range(4000)]
    assert a[-1] / 4000 == pytest.approx(1 / 20.0, rel=0.1)


@pytest.mark.parametrize(
    "shape",
    [
        LoadShape(request_rate=0.0, num_sessions=1),
        LoadShape(burstiness=0.0, num_sessions=1),
        LoadShape(max_concurrency=0, num_sessions=1),
        LoadShape(num_sessions=None, duration_s=None),
        LoadShape(num_sessions=None, duration_s=5.0),  # inf rate, no cap: unbounded burst
    ],
)
def test_bad_load_shapes_are_rejected(shape):
    with pytest.raises(ValueError):
        shape.validate()


VLLM_KEYS = [
    "date",
    "endpoint_type",
    "backend",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    *[
        f"{s}_{m}_ms"
        for m in ("ttft", "tpot", "itl", "e2el")
        for s in ("mean", "median", "std", "p99")
    ],
]


def _doc(detailed: bool) -> dict:
    res = calculate_metrics([_a(), _b(), _c()], duration_s=1.0, percentiles=[90, 99])
    res.update(model_id="m", num_prompts=3, _t0=0.0)
    return result_document(
        res,
        [_a(), _b(), _c()],
        label="x",
        base_url="http://h:1",
        endpoint="/v1/completions",
        tokenizer_id="tok",
        shape=LoadShape(num_sessions=3),
        workload={"name": "random"},
        slo=None,
        percentiles=[90, 99],
        save_detailed=detailed,
    )


def test_result_document_has_vllm_bench_serve_keys():
    doc = _doc(detailed=False)
    missing = [k for k in VLLM_KEYS if k not in doc]
    assert not missing
    assert doc["request_rate"] == "inf" and doc["backend"] == "openai"
    assert "ttfts" not in doc  # per-request lists only with --save-detailed


def test_detailed_result_document_has_per_request_lists():
    doc = _doc(detailed=True)
    for key in (
        "input_lens",
        "output_lens",
        "ttfts",
        "itls",
        "start_times",
        "generated_texts",
        "errors",
    ):
        assert len(doc[key]) == 3
    assert doc["output_lens"] == [4, 2, 0]


def test_result_table_lists_the_figures():
    text = format_result(_doc(detailed=False))
    for needle in ("Successful requests:", "HTTP 500:", "TTFT", "TPOT", "ITL", "E2EL", "p99"):
        assert needle in text


def test_compare_prints_ratios_with_direction():
    a = _doc(detailed=False)
    b = dict(a, output_throughput=a["output_throughput"] * 2, mean_ttft_ms=a["mean_ttft_ms"] / 2)
    text = format_compare([a, b], ["A", "B"])
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "2.000x +" in rows["Output throughput (tok/s)"]
    assert "0.500x +" in rows["TTFT mean (ms)"]  # lower latency is better
    with pytest.raises(ValueError):
        format_compare([a], ["A"])
    assert math.isfinite(b["output_throughput"])
