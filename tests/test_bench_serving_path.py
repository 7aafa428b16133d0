"""The serving-path benchmark's reading of the replica's request log (no Ray)."""

import json

from rayfleet.loadtests import bench_serving_path as bench


def test_engine_records_read_the_replica_log_and_give_the_engines_own_tpot(tmp_path):
    logs = tmp_path / "session_latest" / "logs" / "serve"
    logs.mkdir(parents=True)
    rec = {"request_id": "cmpl-1", "ttft_s": 0.05, "total_s": 0.36, "output_tokens": 32}
    lines = [
        "INFO 2026-11-29 rayfleet_LLMServer abc -- CALL generate OK 3.0ms",
        "INFO 2026-11-29 rayfleet_LLMServer abc -- rayfleet.request " + json.dumps(rec),
        "INFO rayfleet.request " + json.dumps({"request_id": "cmpl-2", "ttft_s": None}),
    ]
    (logs / "replica_rayfleet_LLMServer_abc.log").write_text("\n".join(lines) + "\n")
    (logs / "replica_rayfleet_Ingress_xyz.log").write_text(lines[1] + "\n")  # not a replica's

    got = bench.engine_records(str(tmp_path))
    assert list(got) == ["cmpl-1"]  # no TTFT (a request that failed): not counted
    assert bench.engine_tpot(got["cmpl-1"]) == (0.36 - 0.05) / 31
    assert bench.engine_tpot({"ttft_s": 0.05, "total_s": 0.05, "output_tokens": 1}) is None
