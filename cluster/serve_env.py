"""Ray Serve settings for rayfleet's request path (the "fast path"), and where they go.

A streamed token crosses two Serve hops: replica -> ingress (a `DeploymentHandle` stream)
and ingress -> HTTP proxy. With Serve's defaults each hop costs more than it must: a
replica runs user code on a second event loop in another thread, a handle runs its router on
a third, so every request and every streamed item is handed between threads; and handle
calls travel as Ray actor tasks with their results in the object store. On a small CPU
machine that is CPU taken from the engine: per streamed token at concurrency 16 on 2 cores,
~4.8 ms across the proxy, ingress, replica and Ray's daemons with Serve's defaults, ~3.1 ms
with these settings (the ingress 2.0 -> 1.1, the proxy 1.2 -> 0.75, the replica's Serve
threads 0.9 -> 0.6).

- `REPLICA_ENV`, merged into both deployments' `runtime_env.env_vars` by `app.py` (a value
  set in the config's own `ray_actor_options` wins): user code and the router on the
  replica's own event loop (Serve's `RAY_SERVE_THROUGHPUT_OPTIMIZED` does the same), and
  the ingress calls the replicas over Serve's direct gRPC channel (`_by_reference=False`)
  instead of Ray actor tasks (`RAYFLEET_HANDLE_GRPC`, read by the ingress).
- `PROXY_ENV`, for the HTTP proxy: it is cluster-wide, so it is set where Serve starts:
  `rayfleet serve` (a local cluster) passes `serve_start_options()` to `serve.start`, which
  hands it to Serve's controller and so to the proxies it starts. A cluster started
  elsewhere (KubeRay) takes it as environment variables of its Ray containers.

Direct ingress (the ingress replica serving HTTP itself, with no proxy hop) is set up by
`direct_ingress.py` on a cluster `rayfleet serve` starts: it moves HTTP to per-replica
ports, so it is a choice of topology, not a per-process setting. Not used: the rest of
`RAY_SERVE_THROUGHPUT_OPTIMIZED` (the request-log buffer would hold back the per-request log
lines), and
`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0` in the driver (a blocking `.result()` on a handle
outside an event loop fails there).

`RAYFLEET_SERVE_FAST_PATH=0` in the environment of the process that builds the app (and
starts Serve) turns all of it off: Serve's defaults everywhere (for comparison, or if a Ray
version misbehaves). No ray import here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

FAST_PATH_VAR = "RAYFLEET_SERVE_FAST_PATH"
HANDLE_GRPC_VAR = "RAYFLEET_HANDLE_GRPC"

REPLICA_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    HANDLE_GRPC_VAR: "1",
}

PROXY_ENV: dict[str, str] = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",  # proxy -> ingress over Serve's gRPC channel
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def fast_path_enabled() -> bool:
    return os.environ.get(FAST_PATH_VAR, "1").strip() != "0"


def with_replica_env(ray_actor_options: dict[str, Any] | None) -> dict[str, Any]:
    """`ray_actor_options` with `REPLICA_ENV` under its `runtime_env.env_vars` (the given
    values win); unchanged when the fast path is off."""
    opts = dict(ray_actor_options or {})
    if not fast_path_enabled():
        return opts
    runtime_env = dict(opts.get("runtime_env") or {})
    runtime_env["env_vars"] = {**REPLICA_ENV, **(runtime_env.get("env_vars") or {})}
    opts["runtime_env"] = runtime_env
    return opts


def serve_start_options() -> dict[str, Any]:
    """Extra keyword arguments for `serve.start` on a cluster this process starts: the
    proxy's settings (a variable already set in this environment wins; Ray passes the
    environment on to the cluster's processes)."""
    if not fast_path_enabled():
        return {}
    env = {k: v for k, v in PROXY_ENV.items() if k not in os.environ}
    return {"controller_options": {"runtime_env": {"env_vars": env}}} if env else {}


def handle_by_reference() -> bool:
    """How the ingress calls the replicas: Ray actor tasks (True, Serve's default) or Serve's
    direct gRPC channel (False, when this replica runs with `REPLICA_ENV`)."""
    return os.environ.get(HANDLE_GRPC_VAR) != "1"


@contextlib.contextmanager
def environ(values: dict[str, str], keep_set: bool = False) -> Iterator[None]:
    """`values` in os.environ for the block, as it was after it (Ray passes the driver's
    environment on to a cluster it starts). `keep_set`: a variable already set wins."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if not (keep_set and saved[k] is not None):
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


__all__ = [
    "FAST_PATH_VAR",
    "PROXY_ENV",
    "REPLICA_ENV",
    "environ",
    "fast_path_enabled",
    "handle_by_reference",
    "serve_start_options",
    "with_replica_env",
]
