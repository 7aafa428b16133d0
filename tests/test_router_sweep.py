"""router_sweep: several `bench router` results as one table ordered by rate. The documents
are built with bench_router's own comparison code, so a change to its result layout breaks
this test rather than the sweep silently printing dashes."""

from __future__ import annotations

import json

import pytest
from rayfleet.loadtests.bench_router import Oracle, compare_workload
from rayfleet.loadtests.router_sweep import build_sweep, format_sweep, main

ORACLE = Oracle(1000, 800, 800, 10, 100, 16)


def _run(median: float, hits: float, rounds: list[float] | None = None) -> dict:
    run = {
        "bench": {"median_ttft_ms": median, "p99_ttft_ms": 4 * median, "failed": 0,
                  "request_throughput": 1.0},
        "fleet": {"hits": hits, "queries": 1000.0, "hit_rate": hits / 1000.0},
    }  # fmt: skip
    if rounds:
        run["rounds"] = [_run(m, hits) for m in rounds]
    return run


def _doc(rate: float, kv: float, p2c: float, date: str, rounds=None) -> dict:
    kv_rounds, p2c_rounds = rounds or (None, None)
    runs = {"kv-aware": _run(kv, 780.0, kv_rounds), "power-of-two": _run(p2c, 500.0, p2c_rounds)}
    return {
        "date": date,
        "workloads": {"shared-prefix": {"params": {"request_rate": rate, "requests": 128}}},
        "comparison": {"shared-prefix": compare_workload("shared-prefix", runs, ORACLE)},
    }


def _write(tmp_path, name: str, doc: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_points_are_ordered_by_rate_with_the_runs_own_verdicts(tmp_path):
    light = _write(tmp_path, "a.json", _doc(0.6, 160.0, 256.0, "20261207-0300"))
    heavy = _write(
        tmp_path, "b.json", _doc(2.0, 300.0, 1200.0, "20261207-0400", ([290, 310], [1400, 1000]))
    )
    sweep = build_sweep([heavy, light], "shared-prefix")
    rates = [p["request_rate"] for p in sweep["points"]]
    assert rates == [0.6, 2.0]
    light_pt, heavy_pt = sweep["points"]
    assert light_pt["median_ttft_ratio"] == pytest.approx(1.6)
    assert [t["ok"] for t in light_pt["targets"]] == [True, False]
    assert heavy_pt["median_ttft_ratio"] == pytest.approx(4.0)
    assert heavy_pt["median_ttft_ratio_per_round"] == pytest.approx([1400 / 290, 1000 / 310])
    assert heavy_pt["hit_rate_vs_oracle"]["kv-aware"] == pytest.approx(0.975)
    text = format_sweep(sweep)
    assert "1.60" in text and "4.00" in text and "PF" in text and "PP" in text


def test_a_run_without_the_workload_is_a_clear_error(tmp_path, capsys):
    doc = _doc(1.0, 100.0, 200.0, "d")
    doc["comparison"] = {"random": doc["comparison"].pop("shared-prefix")}
    path = _write(tmp_path, "r.json", doc)
    with pytest.raises(ValueError, match="no 'shared-prefix' workload"):
        build_sweep([path], "shared-prefix")
    assert main([path, "--no-save"]) == 2
    assert "no 'shared-prefix' workload" in capsys.readouterr().err


def test_other_workloads_get_the_ratio_but_no_per_round_verdicts(tmp_path):
    doc = _doc(1.0, 100.0, 110.0, "d", ([90, 110], [100, 120]))
    doc["workloads"] = {"random": doc["workloads"].pop("shared-prefix")}
    runs_cmp = doc["comparison"].pop("shared-prefix")
    runs_cmp["round_targets"] = [[{"target": "median TTFT kv-aware / power-of-two <= 1.05",
                                   "value": 0.9, "bound": 1.05, "ok": True}]]  # fmt: skip
    doc["comparison"] = {"random": runs_cmp}
    point = build_sweep([_write(tmp_path, "r.json", doc)], "random")["points"][0]
    assert point["median_ttft_ratio"] == pytest.approx(1.1)
    assert point["median_ttft_ratio_per_round"] == [None]


def test_main_writes_the_sweep_json_and_figure(tmp_path):
    a = _write(tmp_path, "a.json", _doc(1.0, 150.0, 330.0, "d", ([140, 160], [300, 360])))
    b = _write(tmp_path, "b.json", _doc(2.0, 300.0, 1200.0, "e"))
    out = tmp_path / "out"
    assert main([a, b, "--result-dir", str(out), "--output", "s.json"]) == 0
    doc = json.loads((out / "s.json").read_text())
    assert doc["points"][0]["median_ttft_ratio"] == pytest.approx(2.2)
    assert (out / "s.png").stat().st_size > 0
