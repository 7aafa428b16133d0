"""The Ray Serve application: an `Ingress` (FastAPI) in front of `LLMServer` replicas.

`build_app(args)` is the entry point for Ray's own tooling and for KubeRay's
`serveConfigV2` (`import_path: rayfleet.cluster.app:build_app`):

    serve run rayfleet.cluster.app:build_app config=configs/default.yaml engine.num_kv_blocks=256

`args` may name a YAML file (`config`), carry the config tree itself (nested mappings, as
`serveConfigV2`'s `args:` does), and override single fields with dotted keys; the result is
validated by `RayfleetConfig`. `rayfleet serve` builds the same application.

Under `serve run` and KubeRay, Serve's own `http_options` (and the `route_prefix` of the
application) decide where HTTP listens; `server.host` / `server.port` / `server.route_prefix`
are what `rayfleet serve` passes to Serve. Deployment options in a `serveConfigV2`
`deployments:` list override the ones built here (Serve's precedence).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .config import RayfleetConfig, load_config, parse_config
from .ingress import Ingress
from .llm_server import LLMServer
from .serve_env import with_replica_env

LLM_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "Ingress"

OpenAIIngress = serve.ingress()(Ingress)


def config_from_args(args: dict[str, Any] | None) -> RayfleetConfig:
    """`config` (a YAML path) + nested and dotted overrides -> a validated config."""
    args = dict(args or {})
    path = args.pop("config", None)
    if isinstance(path, dict):  # the tree itself under `config:`
        args = {**path, **args}
        path = None
    return load_config(path, overrides=args)


def request_router_options(cfg: RayfleetConfig) -> dict[str, Any]:
    """`request_router_config` for the LLMServer deployment: rayfleet's router, or nothing
    (Ray Serve's own power-of-two router) when `router.policy` is power-of-two.

    With rayfleet's router, Serve's own `max_queued_requests` is off (-1) unless
    `replica.max_queued_requests` is set: it counts the requests parked in the router's
    admission queue too, so it would answer 429 before the queue is full. The admission
    queue (`cfg.serve_router_config().queue.max_len`) is then the bound on waiting
    requests; an explicit value stays Serve's bound and caps the queue too."""
    if cfg.router.policy == "power-of-two":
        return {}
    r = cfg.serve_router_config()
    from ray.serve.config import RequestRouterConfig

    from .kv_router import ROUTER_CLASS_PATH

    return {
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS_PATH,
            request_router_kwargs=r.model_dump(mode="json"),
            request_routing_stats_period_s=r.stats_poll_interval_s,
        ),
        "max_queued_requests": (
            -1 if cfg.replica.max_queued_requests is None else cfg.replica.max_queued_requests
        ),
    }


def llm_deployment_options(cfg: RayfleetConfig) -> dict[str, Any]:
    """`LLMServer.options(...)`: the replica section's options, then the router's (which
    set `max_queued_requests` under rayfleet's router)."""
    opts = {**cfg.replica.deployment_options(), **request_router_options(cfg)}
    # Serve's request-path settings for this replica's process (`serve_env`).
    opts["ray_actor_options"] = with_replica_env(opts.get("ray_actor_options"))
    return opts


def build_app_from_config(cfg: RayfleetConfig) -> Application:
    payload = cfg.to_args()
    llm = serve.deployment(LLMServer, name=LLM_DEPLOYMENT).options(**llm_deployment_options(cfg))
    s = cfg.server
    ingress = serve.deployment(
        OpenAIIngress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=s.num_ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        ray_actor_options=with_replica_env({"num_cpus": s.ingress_num_cpus}),
    )
    return ingress.bind(llm.bind(payload), payload, LLM_DEPLOYMENT)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Ray Serve's application builder (see the module docstring)."""
    return build_app_from_config(config_from_args(args))


__all__ = [
    "INGRESS_DEPLOYMENT",
    "LLM_DEPLOYMENT",
    "build_app",
    "build_app_from_config",
    "config_from_args",
    "llm_deployment_options",
    "parse_config",
    "request_router_options",
]
