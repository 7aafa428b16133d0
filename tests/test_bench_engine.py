"""`rayfleet bench engine`: the scenarios' bookkeeping, transformers' static batches with
forced lengths, and a tiny end-to-end run of the real engine against transformers."""

from __future__ import annotations

import json

import pytest
from rayfleet.loadtests.bench_engine import (
    EngineBenchConfig,
    HFSide,
    format_table,
    make_prompts,
    run_scenarios,
)
from rayfleet.loadtests.cli import main


class FakeStatic:
    """Static batches of `batch`: every request in a batch runs to the batch's longest."""

    def __init__(self, batch: int):
        self.batch = batch
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, prompts, lens):
        self.calls.append((len(prompts), list(lens)))
        generated = sum(
            max(lens[i : i + self.batch]) * len(lens[i : i + self.batch])
            for i in range(0, len(lens), self.batch)
        )
        return list(lens), generated


def _exact(prompts, lens):
    return list(lens), sum(lens)


def test_scenarios_report_medians_ratios_and_static_batch_waste():
    cfg = EngineBenchConfig(
        num_requests=6,
        input_len=5,
        output_len=7,
        min_output_len=2,
        max_output_len=9,
        batch_size=3,
        repeats=3,
        seed=1,
    )
    hf = FakeStatic(batch=3)
    doc = run_scenarios(
        {"rayfleet": _exact, "hf": hf}, make_prompts(None, 6, 5, 0, 100), cfg, log=lambda s: None
    )
    assert doc["lengths_ok"] == {"rayfleet": True, "hf": True}
    lens = doc["variable"]["output_lens"]
    assert len(lens) == 6 and all(2 <= n <= 9 for n in lens)
    v = doc["variable"]
    assert v["rayfleet"]["total_output_tokens"] == v["hf"]["total_output_tokens"] == sum(lens)
    assert v["hf"]["generated_tokens"] == 3 * max(lens[:3]) + 3 * max(lens[3:])
    t = doc["throughput"]["rayfleet"]
    assert t["total_output_tokens"] == 6 * 7 and t["total_num_tokens"] == 6 * (5 + 7)
    assert len(t["samples_output_tokens_per_second"]) == 3
    assert {"elapsed_time", "requests_per_second", "tokens_per_second"} <= set(t)
    assert "speedup" in doc["decode"] and "ms_per_token" in doc["decode"]["hf"]
    # interleaved: every repeat runs each scenario on both sides (plus one warm-up call)
    assert len(hf.calls) == 1 + 3 * (2 + 1 + 1)
    table = format_table(doc)
    assert "batch-1 decode" in table and "static batches generated" in table


def test_wrong_output_lengths_are_flagged():
    def short(prompts, lens):
        return [max(1, n - 1) for n in lens], sum(lens)

    cfg = EngineBenchConfig(
        num_requests=2,
        input_len=3,
        output_len=4,
        min_output_len=2,
        max_output_len=3,
        batch_size=2,
        repeats=1,
    )
    doc = run_scenarios(
        {"rayfleet": short}, make_prompts(None, 2, 3, 0, 50), cfg, log=lambda s: None
    )
    assert doc["lengths_ok"] == {"rayfleet": False}


@pytest.mark.parametrize(
    "bad",
    [dict(num_requests=0), dict(min_output_len=9, max_output_len=3), dict(scenarios=("nope",))],
)
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        EngineBenchConfig(**bad).validate()


def test_transformers_static_batches_force_exact_lengths(tiny_model_factory):
    folder = tiny_model_factory("hf")
    hf = HFSide(str(folder), "float32", "cpu", batch_size=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    got, generated = hf.generate(prompts, [2, 5, 3, 4])
    assert got == [2, 5, 3, 4]
    assert generated == 5 * 3 + 4 * 1  # each batch runs to its longest request


def test_engine_bench_end_to_end_on_a_tiny_model(
    tiny_model_factory, default_model_dir, tmp_path, capsys
):
    pytest.importorskip("rayfleet.engine.llm")
    folder = tiny_model_factory("tiny", vocab_size=49152)  # the default tokenizer's ids fit
    argv = [
        "bench",
        "engine",
        "--model",
        str(folder),
        "--tokenizer",
        default_model_dir,
        "--num-requests",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--min-output-len",
        "2",
        "--max-output-len",
        "9",
        "--repeats",
        "1",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "engine.json",
    ]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "engine.json").read_text())
    assert doc["lengths_ok"] == {"rayfleet": True, "hf": True}
    assert doc["tool"] == "rayfleet bench engine"
    for scen in ("decode", "throughput", "variable"):
        assert "speedup" in doc[scen]
    assert "Engine benchmark" in capsys.readouterr().out


@pytest.mark.slow
def test_engine_bench_quick_run_on_the_default_model(default_model_dir, tmp_path):
    argv = [
        "bench",
        "engine",
        "--model",
        default_model_dir,
        "--quick",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "engine.json",
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "engine.json").read_text())["lengths_ok"]["rayfleet"]


def test_baseline_side_gets_paired_per_repeat_ratios(monkeypatch):
    """A 'baseline' side (rayfleet with other settings) is interleaved like HF; its ratio is
    given as a ratio of medians and as the median of per-repeat ratios. A fake clock makes
    the baseline exactly twice as slow, and the machine 'drift' (each repeat slower)."""
    import rayfleet.loadtests.bench_engine as be

    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(be.time, "perf_counter", lambda: clock["t"])

    def side(cost):
        def generate(prompts, lens):
            clock["calls"] += 1
            clock["t"] += cost * (1 + clock["calls"] // 4)  # drift
            return _exact(prompts, lens)

        return generate

    cfg = EngineBenchConfig(
        num_requests=4,
        input_len=3,
        output_len=5,
        min_output_len=2,
        max_output_len=6,
        repeats=3,
        scenarios=("throughput", "variable"),
    )
    doc = run_scenarios(
        {"rayfleet": side(1.0), "baseline": side(2.0)},
        make_prompts(None, 4, 3, 0, 100),
        cfg,
        log=lambda s: None,
    )
    for scen in ("throughput", "variable"):
        e = doc[scen]
        assert "speedup" not in e  # no hf side
        assert e["paired_vs_baseline"] == pytest.approx(2.0, rel=0.5)
        assert e["vs_baseline"] > 1.0
    doc["baseline_overrides"] = {"cpu_packed_weights": "none"}
    table = format_table(doc)
    assert "vs_baseline" in table and "paired" in table and "cpu_packed_weights" in table
