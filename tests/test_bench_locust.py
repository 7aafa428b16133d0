"""`loadtests/locustfile.py` under Locust (headless, a few seconds) against the local
fake server: streaming requests succeed and TTFT / TPOT are reported as their own entries."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from rayfleet.loadtests.fake_server import FakeServerProcess

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"


@pytest.mark.parametrize(
    ("workload", "endpoint"),
    [("random", "/v1/completions"), ("multi-turn", "/v1/chat/completions")],
)
def test_locust_streams_the_workload_and_reports_ttft(
    default_model_dir, tmp_path, workload, endpoint
):
    if importlib.util.find_spec("locust") is None:  # importing it would monkeypatch pytest
        pytest.skip("locust is not installed")
    with FakeServerProcess(itl_ms=2) as url:
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "-u",
            "3",
            "-r",
            "3",
            "-t",
            "3s",
            "--host",
            url,
            "--tokenizer",
            default_model_dir,
            "--workload",
            workload,
            "--endpoint",
            endpoint,
            "--input-len",
            "16",
            "--output-len",
            "5",
            "--turns",
            "2",
            "--pool-size",
            "8",
            "--csv",
            str(tmp_path / "run"),
            "--only-summary",
            "--stop-timeout",
            "5",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    main = rows[("POST", endpoint)]
    ttft = rows[("TTFT", endpoint)]
    tpot = rows[("TPOT", endpoint)]
    assert int(main["Request Count"]) > 0 and int(main["Failure Count"]) == 0
    assert int(ttft["Request Count"]) == int(main["Request Count"])
    assert int(tpot["Request Count"]) == int(main["Request Count"])
    # the request's own entry is the end-to-end time, which includes the first token
    assert float(main["Average Response Time"]) >= float(ttft["Average Response Time"])
