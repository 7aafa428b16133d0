"""Replica metrics through Ray's metrics API, named after vLLM's with the `rayfleet:` prefix.

Every metric carries the tags `model_name` and `replica`. The names below are vLLM's with
`rayfleet:` for `vllm:`. Ray 2.60 deprecates `:` in metric names (a warning now, an error
later), so they are registered as `rayfleet_<name>`; Prometheus sees the same series either
way: Ray's metrics agent on each node exports them with its `ray_` prefix, so
`rayfleet:num_requests_running` is scraped as `ray_rayfleet_num_requests_running` (counters
gain `_total`, histograms `_bucket`/`_sum`/`_count`), about 10 s after the first observation.

Where to see them: each node's metrics agent (`http://<node-ip>:<metrics_export_port>/metrics`,
printed by `rayfleet serve`; Ray's Prometheus service discovery file lists every node), the
Ray dashboard's Metrics tab (its embedded Grafana panels need Prometheus and Grafana set up
as Ray documents) and the Grafana dashboards under helm/.

| metric                                    | type      | what                                 |
|-------------------------------------------|-----------|--------------------------------------|
| rayfleet:num_requests_running             | gauge     | requests in the engine's running set |
| rayfleet:num_requests_waiting             | gauge     | requests waiting to be scheduled     |
| rayfleet:num_requests_swapped             | gauge     | requests swapped out to CPU memory   |
| rayfleet:kv_cache_usage_perc              | gauge     | used share of KV blocks (0..1)       |
| rayfleet:num_free_kv_blocks               | gauge     | free KV blocks                       |
| rayfleet:prefix_cache_queries             | counter   | prompt tokens looked up in the cache |
| rayfleet:prefix_cache_hits                | counter   | of those, found cached               |
| rayfleet:num_preemptions                  | counter   | preemptions                          |
| rayfleet:prompt_tokens                    | counter   | prompt tokens computed (prefill)     |
| rayfleet:generation_tokens                | counter   | tokens generated                     |
| rayfleet:request_success                  | counter   | finished requests, tag finished_reason |
| rayfleet:time_to_first_token_seconds      | histogram | arrival to first token               |
| rayfleet:inter_token_latency_seconds      | histogram | between consecutive output tokens    |
| rayfleet:e2e_request_latency_seconds      | histogram | arrival to last token                |
| rayfleet:request_queue_time_seconds       | histogram | arrival to first scheduled           |

The request router (`kv_router`, in every process that calls the replicas through a
`DeploymentHandle`: each ingress replica) records its admission queue's metrics with the
tags `model_name` and `router` (the ingress replica's id, or `pid-<n>` outside a replica);
sum over `router` for the fleet:

| metric                                    | type      | what                                 |
|-------------------------------------------|-----------|--------------------------------------|
| rayfleet:router_queue_length              | gauge     | requests waiting for a replica       |
| rayfleet:router_queue_wait_time_seconds   | histogram | router arrival to binding (0: at once) |
| rayfleet:router_queue_rejected            | counter   | 429s; tag reason: full or timeout    |

(`full`: the queue held `router.queue.max_len`; `timeout`: waited past `queue.max_wait_s`.
Scraped as `ray_rayfleet_router_queue_rejected_total`, like every counter.)
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ray.serve")

_TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]  # fmt: skip
_ITL_BUCKETS = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]  # fmt: skip
_E2E_BUCKETS = [
    0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
]  # fmt: skip
_QUEUE_BUCKETS = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
]  # fmt: skip

# `rayfleet:` in documentation and dashboards; `:` is deprecated in Ray's metric names.
METRIC_PREFIX = "rayfleet_"
TAG_KEYS = ("model_name", "replica")
ROUTER_TAG_KEYS = ("model_name", "router")

# EngineStats' cumulative counters -> metric names.
_COUNTERS = {
    "prefix_cache_queries": "prefix_cache_queries",
    "prefix_cache_hits": "prefix_cache_hits",
    "num_preemptions": "num_preemptions",
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
}


class ReplicaMetrics:
    """The metrics one `LLMServer` replica records (create it inside the replica)."""

    def __init__(self, model_name: str, replica: str):
        from ray.util import metrics as m

        tags = {"model_name": model_name, "replica": replica}

        def gauge(name: str, desc: str) -> Any:
            g = m.Gauge(METRIC_PREFIX + name, description=desc, tag_keys=TAG_KEYS)
            g.set_default_tags(tags)
            return g

        def counter(name: str, desc: str, extra: tuple[str, ...] = ()) -> Any:
            c = m.Counter(METRIC_PREFIX + name, description=desc, tag_keys=TAG_KEYS + extra)
            c.set_default_tags(tags)
            return c

        def histogram(name: str, desc: str, buckets: list[float]) -> Any:
            h = m.Histogram(
                METRIC_PREFIX + name, description=desc, boundaries=buckets, tag_keys=TAG_KEYS
            )
            h.set_default_tags(tags)
            return h

        self.num_requests_running = gauge("num_requests_running", "Requests running")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting")
        self.num_requests_swapped = gauge("num_requests_swapped", "Requests swapped to CPU")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV cache usage (0..1)")
        self.num_free_kv_blocks = gauge("num_free_kv_blocks", "Free KV cache blocks")
        self.counters = {
            stat: counter(name, f"Cumulative {name.replace('_', ' ')}")
            for stat, name in _COUNTERS.items()
        }
        self.request_success = counter(
            "request_success", "Finished requests by finish reason", ("finished_reason",)
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token (s)", _TTFT_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Inter-token latency (s)", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end latency (s)", _E2E_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time waiting before first scheduled (s)", _QUEUE_BUCKETS
        )
        self._last: dict[str, int] = {}

    def record_stats(self, stats: Any) -> None:
        """Publish an `EngineStats` snapshot (gauges; counters advance by the difference)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.num_requests_swapped.set(stats.num_swapped)
        self.kv_cache_usage_perc.set(float(stats.kv_cache_usage))
        self.num_free_kv_blocks.set(stats.num_free_blocks)
        for stat, counter in self.counters.items():
            value = int(getattr(stats, stat))
            delta = value - self._last.get(stat, 0)
            if delta > 0:
                counter.inc(delta)
            self._last[stat] = value

    def record_request(
        self,
        finish_reason: str,
        ttft_s: float | None,
        e2e_s: float | None,
        queue_s: float | None,
        itls_s: list[float],
    ) -> None:
        self.request_success.inc(1, tags={"finished_reason": finish_reason})
        if ttft_s is not None:
            self.ttft.observe(max(ttft_s, 0.0))
        if e2e_s is not None:
            self.e2e.observe(max(e2e_s, 0.0))
        if queue_s is not None:
            self.queue_time.observe(max(queue_s, 0.0))
        for x in itls_s:
            self.itl.observe(max(x, 0.0))


class RouterMetrics:
    """The admission queue's metrics, recorded by one request router (see the table above).

    `backend` is `ray.util.metrics` unless given (tests pass a fake with the same `Gauge`,
    `Counter` and `Histogram`). The model name comes from the replicas' routing stats, so
    it may be set after creation (`set_model_name`). Recording never raises: a metrics
    failure must not fail a request.
    """

    def __init__(self, router: str, model_name: str = "", backend: Any = None) -> None:
        if backend is None:
            from ray.util import metrics as backend
        self.router = router
        self.model_name = model_name
        self._length = 0
        self.queue_length = backend.Gauge(
            METRIC_PREFIX + "router_queue_length",
            description="Requests waiting in the router's admission queue",
            tag_keys=ROUTER_TAG_KEYS,
        )
        self.queue_wait_time = backend.Histogram(
            METRIC_PREFIX + "router_queue_wait_time_seconds",
            description="Arrival at the router to binding to a replica (s)",
            boundaries=_QUEUE_BUCKETS,
            tag_keys=ROUTER_TAG_KEYS,
        )
        self.queue_rejected = backend.Counter(
            METRIC_PREFIX + "router_queue_rejected",
            description="Requests refused by the admission queue (429), by reason",
            tag_keys=ROUTER_TAG_KEYS + ("reason",),
        )
        self._set_tags()

    def _set_tags(self) -> None:
        tags = {"model_name": self.model_name, "router": self.router}
        for m in (self.queue_length, self.queue_wait_time, self.queue_rejected):
            m.set_default_tags(tags)

    def set_model_name(self, model_name: str) -> None:
        if not model_name or model_name == self.model_name:
            return
        try:
            self.queue_length.set(0)  # the series under the old name stops at 0, not stale
            self.model_name = model_name
            self._set_tags()
            self.queue_length.set(self._length)
        except Exception:
            logger.exception("rayfleet router: metrics failed")

    def set_queue_length(self, n: int) -> None:
        self._length = n
        try:
            self.queue_length.set(n)
        except Exception:
            logger.exception("rayfleet router: metrics failed")

    def observe_wait(self, seconds: float) -> None:
        try:
            self.queue_wait_time.observe(max(seconds, 0.0))
        except Exception:
            logger.exception("rayfleet router: metrics failed")

    def rejected(self, reason: str) -> None:
        try:
            self.queue_rejected.inc(1, tags={"reason": reason})
        except Exception:
            logger.exception("rayfleet router: metrics failed")
