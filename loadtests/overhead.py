"""`rayfleet bench overhead`: what the client itself costs per streamed token.

The fake server (`fake_server.py`, no model) runs in its own process and streams fixed
tokens at a fixed pace, noting when it sent each one. The client runs N concurrent
streams against it and reports:
- CPU per streamed token: the client process's CPU time over the run / tokens received
  (the client is the only thing in its process, so this is all its own work);
- delivery lag: for every token, client receive time - server send time (both the
  system-wide monotonic clock), at 1 stream and at N streams. The growth from 1 to N is
  the delay the client's own work adds to the timestamps it reports.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from rayfleet.loadtests.client import StreamingClient
from rayfleet.loadtests.fake_server import FakeServerProcess
from rayfleet.loadtests.metrics import RequestOutcome
from rayfleet.loadtests.serve_bench import LoadShape, LoopLagMonitor, run_load
from rayfleet.loadtests.workloads import Session, Turn

TARGET_MS_PER_TOKEN = 0.2  # the bound at 64 concurrent streams


def delivery_lags(outcomes: list[RequestOutcome], sent: dict[str, list[float]]) -> list[float]:
    """Per token: client receive time - server send time, matched by X-Request-Id."""
    lags: list[float] = []
    for o in outcomes:
        times = sent.get(o.request_id)
        if not times or not o.success:
            continue
        recv = o.token_times()
        n = min(len(recv), len(times))
        lags.extend(r - s for r, s in zip(recv[:n], times[:n], strict=True))
    return lags


async def _measure(url: str, concurrency: int, num_requests: int, tokens: int) -> dict:
    sessions = [Session([Turn("hi", tokens, None)])]
    shape = LoadShape(math.inf, 1.0, concurrency, num_requests)
    async with StreamingClient(
        url, "/v1/completions", "fake-model", max_connections=concurrency
    ) as c:
        # warm the connection pool first, so connection setup is not in the figures
        await run_load(
            c, sessions, LoadShape(math.inf, 1.0, concurrency, concurrency), None, None, "warm"
        )
        monitor = LoopLagMonitor()
        monitor.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        run = await run_load(c, sessions, shape, None, None, f"ovh{concurrency}")
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        lag = await monitor.stop()
        status, body = await c.get_text("/fake/timings")
    sent = json.loads(body) if status == 200 else {}
    delays = np.asarray(delivery_lags(run.outcomes, sent) or [0.0]) * 1000.0
    chunks = sum(o.chunks for o in run.outcomes)
    failed = sum(not o.success for o in run.outcomes)
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "failed": failed,
        "tokens": chunks,
        "wall_s": wall,
        "tokens_per_s": chunks / wall,
        "client_cpu_s": cpu,
        "client_cpu_utilization": cpu / wall,
        "client_cpu_ms_per_token": cpu * 1000.0 / chunks if chunks else None,
        "delivery_lag_mean_ms": float(delays.mean()),
        "delivery_lag_p50_ms": float(np.percentile(delays, 50)),
        "delivery_lag_p99_ms": float(np.percentile(delays, 99)),
        **lag,
    }


def measure(
    concurrency: int = 64, num_requests: int = 256, tokens: int = 128, itl_ms: float = 10.0
) -> dict:
    """Baseline at 1 stream, then `concurrency` streams, against a fresh fake server."""
    load_before = os.getloadavg()[0]
    with FakeServerProcess(itl_ms=itl_ms, record_timings=True) as url:
        base = asyncio.run(_measure(url, 1, max(4, num_requests // 32), tokens))
        with_load = asyncio.run(_measure(url, concurrency, num_requests, tokens))
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "tool": "rayfleet bench overhead",
        "server": {
            "itl_ms": itl_ms,
            "tokens_per_request": tokens,
            "kind": "fake_server (no model)",
        },
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0],
        },
        "baseline_1_stream": base,
        "loaded": with_load,
        "added_delivery_lag_p50_ms": with_load["delivery_lag_p50_ms"] - base["delivery_lag_p50_ms"],
        "client_cpu_ms_per_token": with_load["client_cpu_ms_per_token"],
        "target_ms_per_token": TARGET_MS_PER_TOKEN,
        "within_target": (with_load["client_cpu_ms_per_token"] or math.inf) < TARGET_MS_PER_TOKEN,
    }


def format_overhead(doc: dict) -> str:
    b, w = doc["baseline_1_stream"], doc["loaded"]
    rows = [
        ("concurrent streams", b["concurrency"], w["concurrency"], "d"),
        (
            "requests (failed)",
            f"{b['requests']} ({b['failed']})",
            f"{w['requests']} ({w['failed']})",
            "",
        ),
        ("tokens received", b["tokens"], w["tokens"], "d"),
        ("tokens/s", b["tokens_per_s"], w["tokens_per_s"], ".0f"),
        (
            "client CPU per token (ms)",
            b["client_cpu_ms_per_token"],
            w["client_cpu_ms_per_token"],
            ".4f",
        ),
        ("client CPU utilisation", b["client_cpu_utilization"], w["client_cpu_utilization"], ".1%"),
        ("delivery lag p50 (ms)", b["delivery_lag_p50_ms"], w["delivery_lag_p50_ms"], ".3f"),
        ("delivery lag p99 (ms)", b["delivery_lag_p99_ms"], w["delivery_lag_p99_ms"], ".3f"),
        ("event-loop lag p99 (ms)", b["loop_lag_p99_ms"], w["loop_lag_p99_ms"], ".3f"),
    ]
    out = [
        " Client overhead (fake server, no model) ".center(64, "="),
        f"{'':<30}{'1 stream':>16}{'loaded':>16}",
    ]
    for name, x, y, fmt in rows:
        out.append(f"{name:<30}{format(x, fmt):>16}{format(y, fmt):>16}")
    verdict = "within" if doc["within_target"] else "OVER"
    host = doc.get("host", {})
    out.append("-" * 64)
    out.append(
        f"host load average {host.get('load_avg_1m_before', 0):.2f} on {host.get('cpus')} CPUs; "
        "delivery lag also holds the server's and the OS scheduler's delays"
    )
    out.append(
        f"client CPU per streamed token at {w['concurrency']} streams: "
        f"{doc['client_cpu_ms_per_token']:.4f} ms ({verdict} the {TARGET_MS_PER_TOKEN} ms target)"
    )
    out.append("=" * 64)
    return "\n".join(out)


def add_args(p) -> None:
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--itl-ms", type=float, default=10.0, help="the fake server's pace per stream")
    p.add_argument("--result-dir", default=None, help="default: loadtests/results")
    p.add_argument("--no-save", action="store_true")


def run(args) -> int:
    from rayfleet.loadtests.serve_bench import RESULTS_DIR, write_json

    doc = measure(args.concurrency, args.num_requests, args.tokens, args.itl_ms)
    print(format_overhead(doc))
    if not args.no_save:
        path = Path(args.result_dir) if args.result_dir else RESULTS_DIR
        print(f"result: {write_json(doc, path / 'client_overhead.json')}")
    return 0 if doc["loaded"]["failed"] == 0 else 1
