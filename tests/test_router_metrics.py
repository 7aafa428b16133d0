"""The admission queue's metrics: length (gauge), wait time (histogram), refusals (counter).

Recorded by every request router through Ray's metrics API (`metrics.RouterMetrics`); here
with a fake backend standing in for `ray.util.metrics`, so no Ray cluster is needed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from rayfleet.cluster import kv_router
from rayfleet.cluster.kv_router import RouteHint
from rayfleet.cluster.metrics import RouterMetrics
from rayfleet.cluster.router_config import RouterConfig
from rayfleet.cluster.routing_policy import AdmissionQueue, QueueFull
from rayfleet.engine import KVSnapshot


# ---- a stand-in for ray.util.metrics ---------------------------------------------------
class _Metric:
    def __init__(self, name, description="", tag_keys=(), boundaries=None):
        self.name = name
        self.tag_keys = tuple(tag_keys)
        self.boundaries = boundaries
        self.default_tags: dict = {}
        self.values: dict = {}  # gauge: tags -> last value
        self.counts: dict = defaultdict(float)  # counter: tags -> total
        self.observed: list = []  # histogram: (tags, value)

    def set_default_tags(self, tags):
        self.default_tags = dict(tags)

    def _tags(self, tags):
        t = {**self.default_tags, **(tags or {})}
        assert set(t) == set(self.tag_keys), (t, self.tag_keys)
        return tuple(sorted(t.items()))

    def set(self, value, tags=None):
        self.values[self._tags(tags)] = value

    def inc(self, value=1.0, tags=None):
        self.counts[self._tags(tags)] += value

    def observe(self, value, tags=None):
        self.observed.append((self._tags(tags), value))


class FakeBackend:
    def __init__(self):
        self.metrics: dict[str, _Metric] = {}

    def _make(self, name, **kw):
        m = _Metric(name, **kw)
        self.metrics[name] = m
        return m

    Gauge = Counter = Histogram = _make

    def __getitem__(self, name: str) -> _Metric:
        return self.metrics["rayfleet_" + name]


def tags(model="m", router="r", **extra):
    return tuple(sorted({"model_name": model, "router": router, **extra}.items()))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def queue_with_metrics(**kw):
    backend = FakeBackend()
    m = RouterMetrics("r", "m", backend=backend)
    clock = Clock()
    q = AdmissionQueue(
        clock=clock,
        on_wait=m.observe_wait,
        on_length=m.set_queue_length,
        on_reject=m.rejected,
        **kw,
    )
    return q, backend, clock


# ---- RouterMetrics + AdmissionQueue ----------------------------------------------------
def test_the_metrics_are_named_like_vllms_with_the_rayfleet_prefix_and_tagged_by_model():
    backend = FakeBackend()
    RouterMetrics("r", "m", backend=backend)
    assert set(backend.metrics) == {
        "rayfleet_router_queue_length",
        "rayfleet_router_queue_wait_time_seconds",
        "rayfleet_router_queue_rejected",
    }
    for m in backend.metrics.values():
        assert m.default_tags == {"model_name": "m", "router": "r"}
    assert backend["router_queue_wait_time_seconds"].boundaries


def test_the_length_gauge_follows_pushes_binds_and_departures():
    q, backend, _ = queue_with_metrics(max_len=8)
    gauge = backend["router_queue_length"]
    tickets = [q.push(i) for i in range(3)]
    assert gauge.values[tags()] == 3
    q.remove(tickets[1])  # its client left
    assert gauge.values[tags()] == 2
    q.drain(lambda item: item == 0)  # binds 0, stops at 2
    assert gauge.values[tags()] == 1
    q.drain(lambda item: True)
    assert gauge.values[tags()] == 0


def test_the_wait_histogram_gets_every_admission_fast_path_as_zero():
    q, backend, clock = queue_with_metrics(max_len=8)
    hist = backend["router_queue_wait_time_seconds"]
    q.record_fast_path()
    q.push("a")
    clock.t += 2.5
    q.drain(lambda item: True)
    assert hist.observed == [(tags(), 0.0), (tags(), 2.5)]


def test_a_full_queue_counts_a_rejection_with_reason_full():
    q, backend, _ = queue_with_metrics(max_len=1)
    q.push("a")
    with pytest.raises(QueueFull):
        q.push("b")
    counter = backend["router_queue_rejected"]
    assert dict(counter.counts) == {tags(reason="full"): 1}
    assert backend["router_queue_length"].values[tags()] == 1


def test_a_request_waiting_past_max_wait_counts_a_timeout():
    async def main():
        q, backend, _ = queue_with_metrics(max_len=4, max_wait_s=0.05)
        with pytest.raises(QueueFull) as e:
            await q.wait(lambda: None)  # never places
        assert e.value.reason == "timeout"
        assert dict(backend["router_queue_rejected"].counts) == {tags(reason="timeout"): 1}
        assert backend["router_queue_length"].values[tags()] == 0

    asyncio.run(main())


def test_a_model_name_learned_later_moves_the_gauge_and_zeroes_the_old_series():
    backend = FakeBackend()
    m = RouterMetrics("r", "", backend=backend)
    m.set_queue_length(3)
    m.set_model_name("smol")
    gauge = backend["router_queue_length"]
    assert gauge.values == {tags(model=""): 0, tags(model="smol"): 3}
    m.rejected("full")
    assert dict(backend["router_queue_rejected"].counts) == {tags("smol", reason="full"): 1}


def test_recording_never_raises():
    class Broken(FakeBackend):
        def _make(self, name, **kw):
            m = super()._make(name, **kw)
            m.set = m.inc = m.observe = _raise
            return m

        Gauge = Counter = Histogram = _make

    def _raise(*a, **k):
        raise RuntimeError("metrics agent gone")

    m = RouterMetrics("r", "m", backend=Broken())
    m.set_queue_length(1)
    m.observe_wait(0.1)
    m.rejected("full")
    m.set_model_name("other")


# ---- wired into the Ray Serve request router -------------------------------------------
@dataclass
class FakeReplica:
    replica_id: object
    routing_stats: dict
    max_ongoing_requests: int = 64


def _dep():
    from ray.serve._private.common import DeploymentID

    return DeploymentID(name="LLMServer", app_name="app")


def _replica(name: str, st: dict) -> FakeReplica:
    from ray.serve.request_router import ReplicaID

    return FakeReplica(ReplicaID(unique_id=name, deployment_id=_dep()), st)


def _stats(report: int, **kw) -> dict:
    from rayfleet.cluster.testing import routing_report

    fields = {"model_name": "smol", "kv_snapshot": KVSnapshot("e", -1, frozenset()), **kw}
    return routing_report(report, **fields)


def _pending(rid: str):
    from ray.serve.request_router import PendingRequest

    meta = SimpleNamespace(call_method="generate", internal_request_id=rid, multiplexed_model_id="")
    greq = SimpleNamespace(route=RouteHint(tuple(range(4)), 64))
    return PendingRequest(args=[greq], kwargs={}, metadata=meta)


def test_the_request_router_records_its_queue_under_the_replicas_model_name():
    backend = FakeBackend()

    async def main():
        from ray.serve._private.common import DeploymentHandleSource

        router = kv_router.KVAwareRequestRouter(
            deployment_id=_dep(), handle_source=DeploymentHandleSource.UNKNOWN
        )
        router.initialize_state(**RouterConfig(seed=0, queue={"max_len": 1}).model_dump())
        m = router.metrics
        assert m.router.startswith("pid-")  # not inside a Serve replica
        # Record into the fake backend from here on (the queue calls these same objects).
        fake = RouterMetrics(m.router, backend=backend)
        m.queue_length, m.queue_wait_time, m.queue_rejected = (
            fake.queue_length,
            fake.queue_wait_time,
            fake.queue_rejected,
        )
        a = _replica("a", _stats(1, num_running=8))  # full

        async def no_probe(*args, **kwargs):  # no real replicas to ask for queue lengths
            return None

        router._probe_queue_lens = no_probe
        router._lazily_fetched_loop = asyncio.get_running_loop()
        router.update_replicas([a])
        assert router.metrics.model_name == "smol"  # from the replica's report
        first = asyncio.create_task(router.choose_replicas([a], _pending("q1")))
        await asyncio.sleep(0.05)
        refused = _pending("q2")
        await router.choose_replicas([a], refused)
        with pytest.raises(QueueFull):
            refused.future.result()
        name = router.metrics.router
        assert backend["router_queue_length"].values[tags("smol", name)] == 1
        a.routing_stats = _stats(2, num_running=1)
        router.update_replicas([a])
        assert await asyncio.wait_for(first, 5) == [[a]]
        assert backend["router_queue_length"].values[tags("smol", name)] == 0
        waits = [v for t, v in backend["router_queue_wait_time_seconds"].observed]
        assert len(waits) == 1 and waits[0] > 0
        counts = dict(backend["router_queue_rejected"].counts)
        assert counts == {tags("smol", name, reason="full"): 1}

    asyncio.run(main())
