"""Helpers for tests and benchmarks that start a local Ray cluster on this machine.

Ray binds its processes to the machine's network address, not loopback. `loopback_only()`
moves the calling process into a private network namespace where only `lo` is up (Linux,
root), so every byte a test cluster sends stays on 127.0.0.1; Ray processes started inside
inherit it. `isolated_ray_env()` points HOME at a temporary folder and turns Ray's token
authentication off (nothing is reachable from outside the namespace), so a test leaves no
`~/.ray/auth_token` behind. Fetch the default model *before* entering the namespace.

`local_serve_cluster()` puts these together for live tests (a Ray cluster and Serve's HTTP
proxy on loopback, all torn down on exit); `deploy_app()` runs rayfleet's application on it;
`request_replicas()` reads which LLMServer replica served each request from its log lines.

No ray or torch import at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .direct_ingress import direct_url, free_port
from .direct_ingress import plan as direct_ingress_plan
from .serve_env import environ

CLONE_NEWNET = 0x40000000


def only_loopback() -> bool:
    """True when the only network interface is `lo`."""
    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Run the body in a fresh network namespace with only loopback up; restore afterwards.

    Raises OSError where that is impossible (not root, no unshare). A process that already
    sees only `lo` is left where it is.
    """
    if only_loopback():
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (needs root)")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        try:
            yield
        finally:
            if libc.setns(old, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the host network failed: {os.strerror(err)}")
    finally:
        os.close(old)


@contextlib.contextmanager
def isolated_ray_env(home: str, **extra: str) -> Iterator[None]:
    """Environment for a throwaway local Ray cluster: HOME=home, token auth off, no usage stats.

    RAYFLEET_CACHE_DIR keeps pointing at the real model cache (resolved before HOME moves).
    """
    from rayfleet.engine import default_model_path

    model_dir = default_model_path()  # fetch (if needed) while the network is still there
    env = {
        "HOME": home,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAYFLEET_CACHE_DIR": os.path.dirname(model_dir),
        **extra,
    }
    with environ(env):
        yield


class NoPrivateNetwork(OSError):
    """A loopback-only network namespace could not be entered (`local_serve_cluster`,
    `call_in_ray_sandbox`)."""


def call_in_ray_sandbox(fn: Callable[[], Any], home: str, netns: bool = True) -> Any:
    """`fn()` with `isolated_ray_env(home)`, inside a loopback-only network namespace unless
    `netns` is False (the benchmarks that start their own Ray cluster). Raises
    NoPrivateNetwork, before calling `fn`, when the namespace cannot be entered."""
    if not netns:
        with isolated_ray_env(home):
            return fn()
    net = loopback_only()
    try:
        net.__enter__()
    except OSError as e:
        raise NoPrivateNetwork(f"no loopback-only network namespace: {e}") from e
    try:
        with isolated_ray_env(home):
            return fn()
    finally:
        net.__exit__(None, None, None)


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """What `local_serve_cluster` started: where HTTP listens and where Ray keeps its files."""

    base: str  # http://127.0.0.1:PORT, Serve's HTTP proxy
    temp_dir: Path  # Ray's _temp_dir (logs under session_latest/logs)
    home: Path
    model_path: str  # the default model's folder
    metrics: str | None = None  # Ray's Prometheus export URL, when asked for


@contextlib.contextmanager
def local_serve_cluster(
    *,
    num_cpus: int = 2,
    metrics_export: bool = False,
    prefix: str = "rf",
    skip: Callable[[str], object] | None = None,
    direct_ingress: bool = False,
) -> Iterator[LocalCluster]:
    """A throwaway local Ray cluster with Serve's HTTP proxy on 127.0.0.1, in a private
    loopback-only network namespace with HOME in a temporary folder; torn down (Serve, Ray,
    the namespace, the folder) on exit.

    Ray's `_temp_dir` is a fresh folder directly under /tmp: its socket paths must stay
    under 107 bytes (pytest's tmp_path is too deep). Where no namespace can be entered,
    `skip(reason)` is called (tests pass `pytest.skip`), else `NoPrivateNetwork` is raised.
    Deploy applications with `deploy_app`. `direct_ingress`: ingress replicas serve HTTP
    on their own ports too (as `rayfleet serve` sets it up, `direct_ingress`); `deploy_app`
    returns an application's own URL, and `base` stays Serve's proxy, which routes them all.
    """
    from rayfleet.engine import default_model_path

    model_path = default_model_path()  # fetch (if needed) while the network is still there
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home = root / "home"
    home.mkdir()
    try:
        net = loopback_only()
        try:
            net.__enter__()
        except OSError as e:
            msg = f"needs a private loopback-only network namespace: {e}"
            if skip is not None:
                skip(msg)
            raise NoPrivateNetwork(msg) from e
        try:
            port = free_port()
            # A range of ports (one per application's ingress), as the tests deploy several.
            di = direct_ingress_plan(free_port(), port, 16) if direct_ingress else None
            with isolated_ray_env(str(home), **(di.env if di else {})):
                import ray
                from ray import serve

                metrics_port = free_port() if metrics_export else None
                extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
                try:  # ray.shutdown() also stops what a failed ray.init started
                    ray.init(
                        num_cpus=num_cpus,
                        include_dashboard=False,
                        object_store_memory=1 << 30,
                        _temp_dir=str(root / "r"),
                        log_to_driver=False,
                        **extra,
                    )
                    serve.start(http_options={"host": "127.0.0.1", "port": port})
                    yield LocalCluster(
                        base=f"http://127.0.0.1:{port}",
                        temp_dir=root / "r",
                        home=home,
                        model_path=model_path,
                        metrics=f"http://127.0.0.1:{metrics_port}/metrics"
                        if metrics_port
                        else None,
                    )
                finally:
                    try:
                        if ray.is_initialized():
                            serve.shutdown()
                    finally:
                        ray.shutdown()
        finally:
            net.__exit__(None, None, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def routing_report(report: int, **fields: Any) -> dict[str, Any]:
    """A replica's routing-stats report, shaped as `RoutingStatsReporter.report` makes it:
    an idle replica (100 free blocks of 16 tokens, up to 8 requests, no KV events), report
    number `report`; `fields` override any key (router tests without a replica)."""
    return {
        "report": report,
        "num_running": 0,
        "num_waiting": 0,
        "num_free_blocks": 100,
        "num_total_blocks": 100,
        "block_size": 16,
        "max_num_seqs": 8,
        "queued_prefill_tokens": 0,
        "kv_batches": [],
        "kv_snapshot": None,
        **fields,
    }


def cpu_replicas_config(
    model_path: str,
    num_kv_blocks: int,
    num_replicas: int = 2,
    engine: dict[str, Any] | None = None,
    replica: dict[str, Any] | None = None,
    router: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config tree for live router tests: the model on `num_replicas` CPU replicas of one
    CPU each, with small KV pools (so caches fill and evict) and short contexts; `engine`,
    `replica` and `router` add to or override those sections."""
    return {
        "model": {"path": model_path},
        "engine": {
            "device": "cpu",
            "num_kv_blocks": num_kv_blocks,
            "max_model_len": 512,
            "max_num_seqs": 8,
            **(engine or {}),
        },
        "replica": {"num_replicas": num_replicas, "resources": {"num_cpus": 1}, **(replica or {})},
        "router": dict(router or {}),
    }


def deploy_app(
    config: dict[str, Any], name: str, route_prefix: str = "/", wait: bool = True
) -> str | None:
    """Build rayfleet's application from a config tree and run it under `name` (on the
    cluster `local_serve_cluster` started; waits until it is running unless told not to).
    Returns the application's own base URL where its ingress serves HTTP itself (direct
    ingress, once running), else None (reach it through Serve's proxy)."""
    from ray import serve
    from ray.serve import RunTarget
    from rayfleet.cluster.app import build_app

    serve.run_many(
        [RunTarget(target=build_app(config), name=name, route_prefix=route_prefix)],
        wait_for_applications_running=wait,
    )
    return direct_url(name, "127.0.0.1", route_prefix) if wait else None


def request_replicas(
    temp_dir: Path, app_name: str, request_ids: list[str], timeout_s: float = 15
) -> list[str | None]:
    """Each request's LLMServer replica (its `unique_id`), read from the replicas'
    `rayfleet.request` log lines (written when a request ends); None where none was found
    within `timeout_s`."""
    logs = Path(temp_dir) / "session_latest" / "logs" / "serve"
    deadline = time.monotonic() + timeout_s
    found: dict[str, str] = {}
    while True:
        for f in logs.glob(f"replica_{app_name}_LLMServer_*.log"):
            for line in f.read_text(errors="replace").splitlines():
                if "rayfleet.request " in line:
                    rec = json.loads(line.split("rayfleet.request ", 1)[1])
                    found[rec["request_id"]] = rec["replica"]
        if all(i in found for i in request_ids) or time.monotonic() > deadline:
            return [found.get(i) for i in request_ids]
        time.sleep(0.5)
