"""RouterConfig: the global router's section of the config tree (policy, cost weights, queue).

Pure pydantic (no ray, no torch), so the CLI validates it before Ray starts. Unknown keys
fail at load time (`extra="forbid"`). The cost function the weights feed is spelled out in
`rayfleet.cluster.routing_policy.KVAwarePolicy`; every weight is in *prefill-token
equivalents* (the time it takes the engine to prefill one prompt token), so the terms add up
to an estimate of how long the request would wait for its first token on that replica.

How it reaches the router: `rayfleet.cluster.app` hands this section to Ray Serve as the
`LLMServer` deployment's `request_router_kwargs` (unless the policy is power-of-two, which is
Serve's own router), and every `KVAwareRequestRouter` (one in each process that calls the
replicas: each ingress replica) validates it again. Nothing is pulled by the router: every
`stats_poll_interval_s` Serve's controller collects each replica's routing stats (its load
and its new KV events, `kv_router.RoutingStatsReporter`) and broadcasts them to the routers.

```yaml
router:
  policy: kv-aware            # kv-aware | power-of-two | round-robin
  kv_events: true             # false: approximate index from the router's own placements
  load_bound_epsilon: 0.5     # hot-prefix bound: no replica above (1+eps) x mean load ...
  load_bound_slack: 2         # ... nor above mean + 2 requests, whichever is higher
  hot_prefix_window: 64       # a prefix leading share f of these placements wants ceil(f n) holders
  weights: {prefill_token: 2.0, queued_prefill_token: 1.0, running_request: 8.0,
            waiting_request: 64.0, kv_usage: 64.0}
  stats_poll_interval_s: 0.25 # replicas' load + KV events reach the routers this often
  queue: {max_len: 1024, min_retry_after_s: 1, max_retry_after_s: 60, max_wait_s: null}
```

Under rayfleet's router (kv-aware, round-robin) the admission queue bounds the requests
waiting per caller: Serve's own `max_queued_requests` is switched off unless
`replica.max_queued_requests` is set, which then caps `queue.max_len` as well (see
`rayfleet.cluster.config.ReplicaSection.max_queued_requests`).

"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RoutingPolicyName = Literal["kv-aware", "power-of-two", "round-robin"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CostWeights(_Strict):
    """Weights of the kv-aware cost, each in prefill-token equivalents per unit below.

    cost(r) = prefill_token        x uncached prompt tokens on r           [per token]
            + queued_prefill_token x prompt tokens queued ahead on r       [per token]
            + running_request      x running requests on r                 [per request]
            + waiting_request      x waiting + in-flight requests on r     [per request]
            + kv_usage             x r's KV pool usage (0..1)              [per full pool]
    """

    prefill_token: float = Field(
        2.0,
        ge=0,
        description="per prompt token r must prefill (not in its prefix cache); counts twice: "
        "this request waits for it, and every later request on r queues behind it",
    )
    queued_prefill_token: float = Field(
        1.0, ge=0, description="per prompt token already queued for prefill on r (runs first)"
    )
    running_request: float = Field(
        8.0,
        ge=0,
        description="per running request: its decode share of every step our prefill rides in",
    )
    waiting_request: float = Field(
        64.0,
        ge=0,
        description="per waiting or in-flight request: fixed scheduling cost ahead of ours",
    )
    kv_usage: float = Field(
        64.0,
        ge=0,
        description="at a full KV pool: new blocks evict cached prefixes or preempt requests",
    )


class AdmissionQueueConfig(_Strict):
    """The admission queue: requests wait here while no replica has room, and bind to the
    first that has (late binding). Each router keeps one (a router per ingress replica)."""

    max_len: int = Field(
        1024,
        ge=0,
        description="requests waiting in one router's queue; beyond this: 429 + Retry-After",
    )
    min_retry_after_s: float = Field(1.0, gt=0, description="Retry-After floor (seconds)")
    max_retry_after_s: float = Field(60.0, gt=0, description="Retry-After ceiling (seconds)")
    max_wait_s: float | None = Field(
        None, gt=0, description="a queued request older than this gets 429; null: no limit"
    )

    @model_validator(mode="after")
    def _check(self) -> AdmissionQueueConfig:
        if self.min_retry_after_s > self.max_retry_after_s:
            raise ValueError(
                f"min_retry_after_s ({self.min_retry_after_s}) must be <= "
                f"max_retry_after_s ({self.max_retry_after_s})"
            )
        return self


class RouterConfig(_Strict):
    """How the global router places requests on replicas."""

    policy: RoutingPolicyName = Field(
        "kv-aware",
        description="kv-aware (default); power-of-two (Ray Serve's default); round-robin",
    )
    kv_events: bool = Field(
        True,
        description="index replicas' prefix caches from their KV events; false: approximate "
        "index built from the router's own placements (LRU-aged)",
    )
    weights: CostWeights = Field(default_factory=CostWeights)
    load_bound_epsilon: float | None = Field(
        0.5,
        ge=0,
        description="a replica whose load (running + waiting + in-flight requests) reaches "
        "max(ceil((1 + eps) m), ceil(m) + load_bound_slack), m = (total + 1) / n, takes no new "
        "request, however much of its prompt it caches; null: no bound (hot prefixes may pile "
        "onto one replica)",
    )
    load_bound_slack: int = Field(
        2,
        ge=0,
        description="requests a replica may run above the mean before the load bound applies: "
        "the bound is max(ceil((1 + eps) m), ceil(m) + slack) with m = (total + 1) / n, so at "
        "low load a hot prefix is not re-prefilled elsewhere to save a request's share of "
        "batched decode steps",
    )
    hot_prefix_window: int = Field(
        64,
        ge=0,
        description="placements remembered to find hot prefixes: a prompt whose first block "
        "led a share f of them should be cached on ceil(f x n) of the n replicas; while fewer "
        "hold it, it goes to the least-loaded replica that does not, if that one is less "
        "loaded than the cheapest holder (0: off)",
    )
    pending_placement_ttl_s: float | None = Field(
        2.0,
        gt=0,
        description="with KV events on: count a prompt as cached on the replica it was just "
        "sent to for this long, until that replica's events report it (a burst of one prefix "
        "arriving during its first prefill stays together); null: events only",
    )
    approx_blocks_per_replica: int = Field(
        16384,
        ge=1,
        description="approximate and pending-placement indexes: blocks remembered per replica",
    )
    approx_ttl_s: float | None = Field(
        600.0, gt=0, description="approximate index: forget a placement after this; null: never"
    )
    stats_poll_interval_s: float = Field(
        0.25,
        gt=0,
        description="Serve's request_routing_stats_period_s: how often the controller "
        "collects each replica's load and new KV events and broadcasts them to the routers",
    )
    queue: AdmissionQueueConfig = Field(default_factory=AdmissionQueueConfig)
    seed: int | None = Field(None, description="tie-break RNG seed; null: random")
