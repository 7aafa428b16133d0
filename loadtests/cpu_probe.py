"""Where a small machine's CPU goes while `rayfleet serve` runs: who wakes up, and how often
the engine's threads are switched out.

    python -m rayfleet.loadtests.cpu_probe [--base-url http://127.0.0.1:8000] [--window 10]
        [--tokens 200] [--streams 3] [--output NAME.json]

Run it on the machine that serves (it reads `/proc`), against a server that is otherwise
idle. Three phases:

1. idle: every process's CPU and thread wake-ups (voluntary context switches, summed over
   its threads) over `--window` seconds;
2. the replica under one stream: `--streams` requests of `--tokens` tokens each (greedy,
   `ignore_eos`), one after the other, while the busiest threads of the LLMServer replica
   process (the first found, when there are several) are sampled: their CPU, and their voluntary (they slept) and involuntary (they
   were switched out) context switches per second;
3. the client's median inter-token latency of those streams.

Why it matters on a small machine: the engine's OpenMP threads use every core, and a
parallel region waits for its slowest thread, so every time something else runs on a core
the whole step waits. On 2 cores (2026-11-29, `results/cpu_probe-cpu-2core-20261129.json`
and earlier one-off runs) the idle cluster took 12-16% of one core in ~2,000 wake-ups a
second, the engine's two threads were switched out ~270-670 times a second each (40-50 with
the engine alone), and batch-1 decode ran at 30-31 ms/token against 24-25 alone. Prints
tables and writes JSON (`--result-dir`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayfleet.loadtests.report import save_result

REPLICA_MARK = "LLMServer"  # in the replica process's title (ray::ServeReplica:APP:LLMServer)


@dataclass(frozen=True, slots=True)
class TaskCounters:
    """One thread's (or a process's, summed) counters from /proc."""

    cpu_ticks: int  # utime + stime, in clock ticks
    voluntary: int  # context switches where it slept
    involuntary: int  # context switches where it was switched out while runnable


def _read_task(path: Path) -> tuple[str, TaskCounters]:
    stat = (path / "stat").read_text()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    vol = inv = 0
    for line in (path / "status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches"):
            inv = int(line.split()[1])
    return name, TaskCounters(int(fields[11]) + int(fields[12]), vol, inv)


def thread_counters(pid: int) -> dict[int, tuple[str, TaskCounters]]:
    """tid -> (thread name, counters) for every thread of `pid` (threads that exit between
    the listing and the read are left out)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _read_task(Path(f"/proc/{pid}/task/{tid}"))
        except (OSError, ValueError, IndexError):
            continue
    return out


def process_counters() -> dict[int, tuple[str, TaskCounters]]:
    """pid -> (command line, counters summed over its threads) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            threads = thread_counters(pid)
        except OSError:
            continue
        total = TaskCounters(
            sum(c.cpu_ticks for _, c in threads.values()),
            sum(c.voluntary for _, c in threads.values()),
            sum(c.involuntary for _, c in threads.values()),
        )
        out[pid] = (cmd.strip()[:100], total)
    return out


def rates(
    before: dict[int, tuple[str, TaskCounters]],
    after: dict[int, tuple[str, TaskCounters]],
    seconds: float,
) -> list[dict[str, Any]]:
    """Per key present in both: CPU (% of one core) and switches per second, busiest first."""
    hz = os.sysconf("SC_CLK_TCK")
    rows = []
    for key, (name, b) in after.items():
        if key not in before:
            continue
        a = before[key][1]
        rows.append(
            {
                "id": key,
                "name": name,
                "cpu_pct": 100.0 * (b.cpu_ticks - a.cpu_ticks) / hz / seconds,
                "voluntary_per_s": (b.voluntary - a.voluntary) / seconds,
                "involuntary_per_s": (b.involuntary - a.involuntary) / seconds,
            }
        )
    rows.sort(key=lambda r: (r["cpu_pct"], r["voluntary_per_s"]), reverse=True)
    return rows


def find_replica() -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::ServeReplica") and REPLICA_MARK in title:
                return int(entry)
    return None


async def _streams(base_url: str, tokens: int, n: int) -> list[float]:
    from rayfleet.loadtests.client import StreamingClient

    async with StreamingClient(base_url, ignore_eos=True, extra_body={"temperature": 0}) as c:
        c.model = await c.first_model()
        itl: list[float] = []
        for i in range(n):
            out = await c.request(f"Tell me a long story about the sea, part {i}.", tokens)
            if not out.success:
                raise RuntimeError(f"stream failed: {out.error}")
            itl.append(statistics.median(out.itl) * 1e3)
        return itl


def probe(base_url: str, window: float, tokens: int, streams: int) -> dict[str, Any]:
    before = process_counters()
    time.sleep(window)
    idle = rates(before, process_counters(), window)
    pid = find_replica()
    if pid is None:
        raise RuntimeError("no LLMServer replica process on this machine")
    t0 = time.monotonic()
    threads_before = thread_counters(pid)
    itl = asyncio.run(_streams(base_url, tokens, streams))
    busy = rates(threads_before, thread_counters(pid), time.monotonic() - t0)
    return {
        "idle_processes": idle,
        "idle_cpu_pct_total": sum(r["cpu_pct"] for r in idle),
        "idle_wakeups_per_s_total": sum(r["voluntary_per_s"] for r in idle),
        "replica_pid": pid,
        "replica_threads": busy,
        "itl_median_ms_per_stream": itl,
    }


def report(doc: dict[str, Any], top: int = 10) -> None:
    print(
        f"idle, {doc['config']['window']:.0f} s: {doc['idle_cpu_pct_total']:.1f}% of one core, "
        f"{doc['idle_wakeups_per_s_total']:.0f} wake-ups/s"
    )
    print(f"{'cpu %':>7} {'wake-ups/s':>11}  process")
    for r in doc["idle_processes"][:top]:
        print(f"{r['cpu_pct']:>7.2f} {r['voluntary_per_s']:>11.0f}  {r['name'][:70]}")
    print(f"\nreplica {doc['replica_pid']} under one stream at a time, busiest threads:")
    print(f"{'cpu %':>7} {'slept/s':>8} {'switched out/s':>15}  thread")
    for r in doc["replica_threads"][:4]:
        print(
            f"{r['cpu_pct']:>7.1f} {r['voluntary_per_s']:>8.0f} {r['involuntary_per_s']:>15.0f}"
            f"  {r['id']} {r['name']}"
        )
    print(
        "\nclient median ITL per stream (ms):",
        [round(x, 2) for x in doc["itl_median_ms_per_stream"]],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--window", type=float, default=10.0, help="idle window, seconds")
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    p.add_argument("--streams", type=int, default=3)
    p.add_argument("--result-dir", default="loadtests/results")
    p.add_argument("--output", default="cpu_probe.json", help="file name in --result-dir")
    args = p.parse_args(argv)
    if not Path("/proc/self/task").is_dir():
        print("cpu_probe: needs Linux /proc", file=sys.stderr)
        return 2
    doc = {
        "benchmark": "cpu_probe",
        "config": vars(args),
        "machine": {"cpus": os.cpu_count()},
        **probe(args.base_url, args.window, args.tokens, args.streams),
    }
    report(doc)
    print(f"\nwrote {save_result(args.result_dir, args.output, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
