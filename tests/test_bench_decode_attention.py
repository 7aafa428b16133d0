"""The decode-attention micro-benchmark runs end to end on a tiny shape and writes its JSON."""

from __future__ import annotations

import json

import pytest
from rayfleet.kernels import cpu_kernels
from rayfleet.loadtests import bench_decode_attention


def test_bench_decode_attention_writes_every_way(tmp_path, capsys):
    if not cpu_kernels.available():
        pytest.skip("C++ CPU kernels not built here")
    args = ["--seqs", "3", "--layers", "2", "--min-ctx", "5", "--max-ctx", "40"]
    args += ["--iters", "1", "--rounds", "1", "--kv-bytes", "1000000"]
    assert bench_decode_attention.main([*args, "--result-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "decode_attention-cpu.json").read_text())
    for mode in ("cold", "hot"):
        assert res[mode]["kv_bytes"] > 0
        for way in ("cpu-kernel", "reference", "torch.sum floor"):
            assert res[mode][way]["median_ms"] > 0
    assert "cpu-kernel" in capsys.readouterr().out
