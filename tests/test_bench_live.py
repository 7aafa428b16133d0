"""`rayfleet bench serve` against a live local server: the model-less fake server in a
child process on 127.0.0.1. Runs complete with zero failures and with counts that agree
with the server's own counters; the client's overhead per streamed token is measured and
printed (never asserted: tests make no claims about wall-clock time)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from rayfleet.loadtests import cli, overhead
from rayfleet.loadtests.fake_server import FakeServerProcess
from rayfleet.loadtests.serve_bench import LoadShape, benchmark_target
from rayfleet.loadtests.workloads import (
    TokenSource,
    load_tokenizer,
    multi_turn_workload,
    random_workload,
    shared_prefix_workload,
)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return load_tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def server(default_model_dir):
    """Streams one fixed token per chunk every 2 ms; counts prompts with the real tokenizer."""
    with FakeServerProcess(itl_ms=2, tokenizer=default_model_dir) as url:
        yield url


def _run(url, sessions, shape, **kw):
    kw.setdefault("metrics_wait_s", 5.0)
    return asyncio.run(benchmark_target(url, sessions, [], shape, **kw))


def test_random_run_completes_with_zero_failures_and_counts_agree_with_the_server(server, tok):
    sessions = random_workload(
        TokenSource(tok, seed=0), 48, input_len=40, output_len=12, range_ratio=0.25
    )
    res, outcomes = _run(
        server, sessions, LoadShape(max_concurrency=16, num_sessions=48), ignore_eos=True
    )
    assert res["failed"] == 0 and res["completed"] == 48
    assert res["total_output_tokens"] == sum(s.turns[0].output_len for s in sessions)
    assert res["total_input_tokens"] == sum(s.turns[0].prompt_len for s in sessions)
    assert res["token_count_source"] == "usage"
    assert res["token_count_mismatches"] == 0  # usage agrees with the streamed chunks
    assert res["prompt_len_mismatches"] == 0  # the server counted the prompts we built
    assert res["server_check"] and all(c["agree"] for c in res["server_check"].values())
    assert res["max_concurrent_requests"] <= 16
    assert all(o.ttft > 0 and len(o.itl) == o.chunks - 1 for o in outcomes)


def test_chat_shared_prefix_run_agrees_with_the_server(server, tok):
    sessions = shared_prefix_workload(TokenSource(tok, seed=1), 3, 4, 60, 10, 6, chat=True)
    res, _ = _run(
        server,
        sessions,
        LoadShape(max_concurrency=6, num_sessions=12),
        endpoint="/v1/chat/completions",
    )
    assert (res["completed"], res["failed"]) == (12, 0)
    assert res["prompt_len_mismatches"] == 0
    assert all(c["agree"] for c in res["server_check"].values())


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_multi_turn_resends_the_growing_history(server, tok, endpoint):
    convs = multi_turn_workload(TokenSource(tok, seed=2), 3, turns=3, input_len=15, output_len=5)
    shape = LoadShape(max_concurrency=4, num_sessions=3)
    res, outcomes = _run(server, convs, shape, endpoint=endpoint, tokenizer=tok)
    assert (res["completed"], res["failed"]) == (9, 0)
    assert all(c["agree"] for c in res["server_check"].values())
    by_conv: dict[str, list] = {}
    for o in outcomes:
        _, conv, turn = o.request_id.rsplit("-", 2)
        by_conv.setdefault(conv, []).append((int(turn), o.prompt_tokens))
    for turns in by_conv.values():
        lens = [n for _, n in sorted(turns)]
        # each turn: the previous prompt + its 5-token reply + 15 new user tokens (+ template)
        assert all(b >= a + 5 + 15 for a, b in zip(lens, lens[1:], strict=False))
    assert res["num_prompts"] == 3


def test_failed_requests_are_counted_with_their_reasons(tok):
    sessions = random_workload(TokenSource(tok, seed=3), 12, 8, 4)
    with FakeServerProcess(itl_ms=1, fail_every=3) as url:
        res, outcomes = _run(url, sessions, LoadShape(max_concurrency=1, num_sessions=12))
    assert (res["completed"], res["failed"]) == (8, 4)
    assert res["error_reasons"] == {"HTTP 500": 4}
    assert all("injected failure" in o.error for o in outcomes if not o.success)
    assert res["server_check"]["request_success"]["agree"]


def test_unreachable_server_fails_every_request_without_raising(tok):
    sessions = random_workload(TokenSource(tok, seed=3), 3, 8, 4)
    res, _ = _run("http://127.0.0.1:9", sessions, LoadShape(num_sessions=3), model="m")
    assert (res["completed"], res["failed"]) == (0, 3)
    assert res["server_metrics"] is None
    assert list(res["error_reasons"]) == ["ClientConnectorError"]


def test_poisson_arrivals_bounded_by_duration(server, tok):
    sessions = random_workload(TokenSource(tok, seed=4), 10, 8, 3)
    shape = LoadShape(request_rate=40.0, burstiness=0.5, num_sessions=None, duration_s=0.5, seed=1)
    res, outcomes = _run(server, sessions, shape)
    assert res["failed"] == 0 and res["completed"] == res["num_prompts"] > 0
    assert len(outcomes) == res["num_prompts"]  # the pool of 10 is cycled as needed


def test_warmup_requests_are_not_counted(server, tok):
    sessions = random_workload(TokenSource(tok, seed=5), 4, 8, 3)
    warm = random_workload(TokenSource(tok, seed=6), 3, 8, 3)
    res, outcomes = asyncio.run(
        benchmark_target(server, sessions, warm, LoadShape(num_sessions=4), metrics_wait_s=5.0)
    )
    assert res["completed"] == len(outcomes) == 4
    assert res["server_check"]["request_success"] == {"client": 4, "server": 4.0, "agree": True}


def test_cli_serve_writes_vllm_style_json_and_png_and_compare_reads_them(
    server, default_model_dir, tmp_path, capsys
):
    base = [
        "bench",
        "serve",
        "--base-url",
        server,
        server,
        "--label",
        "one",
        "two",
        "--tokenizer",
        default_model_dir,
        "--num-prompts",
        "8",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--max-concurrency",
        "4",
        "--result-dir",
        str(tmp_path),
        "--disable-tqdm",
        "--slo",
        "ttft:10000",
        "tpot:10000",
        "--metrics-wait",
        "5",
        "--num-warmups",
        "2",
        "--save-detailed",
    ]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result: one" in out and "Serving Benchmark Result: two" in out
    assert "x/one" not in out and "two/one" in out  # the side-by-side table
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2
    doc = json.loads(files[0].read_text())
    assert doc["completed"] == 8 and doc["failed"] == 0
    assert doc["request_goodput"] == pytest.approx(doc["request_throughput"])
    assert doc["endpoint_type"] == "openai" and doc["model_id"] == "fake-model"
    assert len(doc["ttfts"]) == 8 and doc["output_lens"] == [4] * 8
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 3  # one per run and the overlay
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    assert (
        cli.main(
            ["bench", "compare", str(files[0]), str(files[1]), "--plot", str(tmp_path / "cmp.png")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Output throughput (tok/s)" in out and "x" in out
    assert (tmp_path / "cmp.png").exists()


def test_cli_rejects_bad_arguments(default_model_dir, capsys):
    assert cli.main(["bench", "serve", "--tokenizer", default_model_dir, "--slo", "itl:5"]) == 2
    assert "unknown SLO" in capsys.readouterr().err


def test_client_overhead_per_streamed_token_at_64_streams_is_measured(capsys):
    """The issue's bound is 0.2 ms of client work per streamed token at 64 streams. The
    figure is printed; asserting on it would make the test depend on the machine."""
    doc = overhead.measure(concurrency=64, num_requests=128, tokens=64, itl_ms=5.0)
    loaded = doc["loaded"]
    assert loaded["concurrency"] == 64 and loaded["failed"] == 0
    assert loaded["tokens"] == 128 * 64
    assert math.isfinite(doc["client_cpu_ms_per_token"])
    with capsys.disabled():
        print("\n" + overhead.format_overhead(doc))
