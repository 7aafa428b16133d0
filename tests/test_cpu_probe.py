"""The CPU probe's /proc reading and rates (no Ray, no server)."""

import os
import threading
import time

import pytest
from rayfleet.loadtests import cpu_probe

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")


def test_thread_counters_see_a_busy_thread_use_cpu():
    stop = threading.Event()
    tid: list[int] = []

    def spin():
        tid.append(threading.get_native_id())
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin, name="probe-spin")
    t.start()
    try:
        while not tid:
            time.sleep(0.01)
        before = cpu_probe.thread_counters(os.getpid())
        time.sleep(0.3)
        after = cpu_probe.thread_counters(os.getpid())
    finally:
        stop.set()
        t.join()
    assert threading.get_native_id() in before  # this thread too
    rows = {r["id"]: r for r in cpu_probe.rates(before, after, 0.3)}
    assert rows[tid[0]]["cpu_pct"] > 0
    assert after[tid[0]][1].cpu_ticks > before[tid[0]][1].cpu_ticks


def test_process_counters_include_this_process_with_its_command_line():
    procs = cpu_probe.process_counters()
    name, counters = procs[os.getpid()]
    assert "python" in name or "pytest" in name
    assert counters.cpu_ticks > 0


def test_rates_are_per_second_busiest_first_and_skip_what_was_not_there_before():
    c = cpu_probe.TaskCounters
    hz = os.sysconf("SC_CLK_TCK")
    before = {1: ("a", c(0, 10, 0)), 2: ("b", c(0, 0, 0))}
    after = {1: ("a", c(hz, 30, 4)), 2: ("b", c(2 * hz, 0, 0)), 3: ("new", c(5 * hz, 0, 0))}
    rows = cpu_probe.rates(before, after, 2.0)
    assert [r["id"] for r in rows] == [2, 1]
    assert rows[0]["cpu_pct"] == pytest.approx(100.0)
    assert rows[1] == {
        "id": 1,
        "name": "a",
        "cpu_pct": pytest.approx(50.0),
        "voluntary_per_s": 10.0,
        "involuntary_per_s": 2.0,
    }
