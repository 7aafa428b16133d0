"""Direct ingress: the ingress replica serves HTTP on its own port, with no Serve proxy hop.

Through Serve's HTTP proxy, every request and every streamed item crosses one more process
and one more Ray hop (proxy -> ingress) before it reaches rayfleet's code. Ray Serve 2.60 can
instead start an HTTP server inside each ingress replica ("direct ingress"; on by default
under `RAY_SERVE_THROUGHPUT_OPTIMIZED`, where HAProxy balances the replicas' ports). Measured
here (`python -m rayfleet.loadtests.serve_floor`, 2 cores, concurrency 1): a streamed
first chunk through proxy + ingress + one handle hop in ~9.5 ms, straight to the ingress
+ one handle hop in ~3 ms.

`rayfleet serve` on a local cluster with one ingress replica turns it on: Serve's settings
are read when its processes import it, so they go into the environment before Ray starts
(`DirectIngressPlan.env`), the ingress takes `server.port` (the port range is that one
port), and Serve's proxy, still started, listens on another port as a fallback that routes
every application. Where the ingress landed is read back from Serve's controller
(`direct_url`), so the printed URL is the one that answers. A cluster started elsewhere
(KubeRay, `RAY_ADDRESS`) keeps whatever its own environment says; `helm/README.md` and the
README say how to turn it on there. `RAYFLEET_SERVE_FAST_PATH=0` turns it off with the
rest of the fast path (`serve_env`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket

from .serve_env import environ, fast_path_enabled

ENABLE_VAR = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
MIN_PORT_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
MAX_PORT_VAR = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"  # exclusive (Serve's `range`)
# Serve keeps a released port out of its pool for a while (so a load balancer in front
# drops it first) and holds a stopping ingress open for 30 s to drain. With no balancer in
# front, both only delay a restarted ingress taking its port back and Ctrl-C.
QUARANTINE_VAR = "RAY_SERVE_PORT_QUARANTINE_S"
DRAIN_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


@dataclasses.dataclass(frozen=True)
class DirectIngressPlan:
    """Where HTTP listens on a cluster this process starts."""

    enabled: bool
    port: int  # the ingress replica's own port (the first of the range) when enabled
    proxy_port: int  # Serve's proxy: the fallback, and the only entry point when disabled
    env: dict[str, str]  # to put in os.environ before Ray starts

    def apply(self) -> None:
        """Set `env` (a variable already set in this environment wins), before `ray.init`:
        Ray passes the driver's environment on to the processes of a cluster it starts.
        For the life of the process (`applied` undoes it on exit)."""
        for k, v in self.env.items():
            os.environ.setdefault(k, v)

    def applied(self) -> contextlib.AbstractContextManager[None]:
        """`apply` for a block only (tests and benchmarks that run in one process)."""
        return environ(self.env, keep_set=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def plan(port: int, proxy_port: int, num_ingress_replicas: int = 1) -> DirectIngressPlan:
    """Direct ingress on `port..port+num_ingress_replicas-1` with Serve's proxy on
    `proxy_port`, when the fast path is on and `port` is a real port; else the proxy on
    `port` (the settings of old). Several ingress replicas each take one port of the range;
    the proxy balances them."""
    if not fast_path_enabled() or port == 0 or os.environ.get(ENABLE_VAR) == "0":
        return DirectIngressPlan(False, port, port, {})
    if proxy_port in range(port, port + num_ingress_replicas):
        raise ValueError(
            f"Serve's proxy port {proxy_port} falls in the ingress ports "
            f"{port}..{port + num_ingress_replicas - 1}"
        )
    env = {
        ENABLE_VAR: "1",
        MIN_PORT_VAR: str(port),
        MAX_PORT_VAR: str(port + num_ingress_replicas),
        QUARANTINE_VAR: "0",
        DRAIN_VAR: "0",
    }
    return DirectIngressPlan(True, port, proxy_port, env)


def ingress_targets(app_name: str) -> list[tuple[str, int]]:
    """(host, port) of each running ingress replica of `app_name` serving HTTP itself, from
    Serve's controller (the list it gives load balancers); empty without direct ingress or
    before the ingress runs. Ray 2.60's controller method (Ray is pinned to 2.60)."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    try:
        groups = ray.get(controller.get_target_groups.remote(app_name))
    except Exception:  # no such application (yet)
        return []
    out: list[tuple[str, int]] = []
    for g in groups:
        if g.protocol != RequestProtocol.HTTP or g.app_name != app_name:
            continue
        out += [(t.ip, t.port) for t in g.targets]
    return out


def direct_url(app_name: str, host: str, route_prefix: str) -> str | None:
    """The base URL of `app_name`'s ingress replica on its own port (the lowest, with
    several), or None where it serves no HTTP itself (no direct ingress, not running yet).
    `host` is the address clients use (the bind host, or 127.0.0.1 for a wildcard)."""
    ports = [p for _, p in ingress_targets(app_name)]
    return f"http://{host}:{min(ports)}{route_prefix.rstrip('/')}" if ports else None


__all__ = ["DirectIngressPlan", "free_port", "direct_url", "ingress_targets", "plan"]
