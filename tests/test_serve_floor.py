"""The Ray Serve floor benchmark (`loadtests/serve_floor.py`): its table math, and one short
live run on a local Ray cluster."""

from __future__ import annotations

import json

import pytest
from rayfleet.loadtests import serve_floor


def test_summarize_takes_medians_and_p90_per_route():
    rows = serve_floor.summarize({"/direct": [1.0, 2.0, 3.0], "/hop": [10.0, 30.0, 20.0, 40.0]})
    assert rows[0] == {
        "route": "/direct",
        "n": 3,
        "first_chunk_p50_ms": 2.0,
        "first_chunk_p90_ms": pytest.approx(2.8),
    }
    assert rows[1]["first_chunk_p50_ms"] == 25.0
    assert rows[1]["first_chunk_p90_ms"] == pytest.approx(37.0)


@pytest.mark.ray
def test_a_short_live_run_times_both_routes_through_both_entry_points(tmp_path):
    rc = serve_floor.main(
        ["--requests", "3", "--result-dir", str(tmp_path), "--output", "floor.json"]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "floor.json").read_text())
    assert [r["route"] for r in doc["results"]] == [
        "proxy /direct",
        "proxy /hop",
        "ingress /direct",
        "ingress /hop",
    ]
    for r in doc["results"]:
        assert r["n"] == 3 and 0 < r["first_chunk_p50_ms"] < 10_000
