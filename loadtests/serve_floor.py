"""What Ray Serve's request path costs by itself on this machine: the floor under rayfleet's
serving-path overhead (`bench_serving_path`).

    python -m rayfleet.loadtests.serve_floor [--requests 60] [--output NAME.json]

A trivial app with rayfleet's topology and Serve settings (`cluster/serve_env.py`, as
`rayfleet serve` uses them): a FastAPI ingress that, for `/hop`, opens a streaming handle
call to a second deployment whose generator yields one item, and answers with it as a
server-sent event; `/direct` answers the same event from the ingress alone. No model, no
validation, no tokens. Time to the first response chunk, measured by an HTTP client over
loopback, the routes taking turns, each through two entry points: Serve's proxy, and the
ingress replica's own HTTP port (direct ingress, as `rayfleet serve` sets it up:
`cluster/direct_ingress.py`). `ingress /hop` is the floor of rayfleet's TTFT overhead
(client -> ingress -> replica -> back); `proxy /hop` adds the proxy's hop (the path under
KubeRay's defaults); `/direct` is the entry point and the ingress alone.
Runs Ray in a loopback-only network namespace when it can (root), HOME in a temporary
folder. Prints a table and writes JSON (`--result-dir`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROUTES = ("/direct", "/hop")
ENTRIES = ("proxy", "ingress")


def build_floor_app():
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from ray import serve
    from rayfleet.cluster.serve_env import handle_by_reference, with_replica_env

    opts = with_replica_env(None)

    @serve.deployment(max_ongoing_requests=64, ray_actor_options=opts)
    class FloorReplica:
        async def generate(self, n: int):
            for i in range(n):
                yield i

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64, ray_actor_options=opts)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, replica) -> None:
            self.replica = replica.options(stream=True, _by_reference=handle_by_reference())

        @api.post("/direct")
        async def direct(self):
            async def body():
                yield b"data: 0\n\n"

            return StreamingResponse(body(), media_type="text/event-stream")

        @api.post("/hop")
        async def hop(self):
            gen = self.replica.generate.remote(1)
            first = await gen.__anext__()

            async def body():
                yield f"data: {first}\n\n".encode()
                async for _ in gen:
                    pass

            return StreamingResponse(body(), media_type="text/event-stream")

    return FloorIngress.bind(FloorReplica.bind())


def measure(bases: dict[str, str], requests: int, warmup: int = 10) -> dict[str, list[float]]:
    """First-chunk times (ms) per "entry route" (`bases`: entry point -> base URL); the
    targets take turns, which one goes first rotating."""
    import httpx

    targets = [(f"{e} {r}", base + r) for e, base in bases.items() for r in ROUTES]
    out: dict[str, list[float]] = {name: [] for name, _ in targets}
    with httpx.Client(timeout=30) as c:
        for _, url in targets:
            for _ in range(warmup):
                c.post(url)
        for i in range(requests):
            k = i % len(targets)
            for name, url in targets[k:] + targets[:k]:
                t0 = time.perf_counter()
                with c.stream("POST", url) as resp:
                    chunks = resp.iter_bytes()
                    for chunk in chunks:
                        if chunk:
                            break
                    out[name].append((time.perf_counter() - t0) * 1e3)
                    for _ in chunks:
                        pass
    return out


def _run(args) -> dict[str, list[float]]:
    import ray
    from ray import serve
    from rayfleet.cluster import direct_ingress
    from rayfleet.cluster.serve_env import serve_start_options
    from rayfleet.cluster.testing import free_port

    port = free_port()
    di = direct_ingress.plan(free_port(), port)
    temp = tempfile.mkdtemp(prefix="rff-", dir="/tmp")  # AF_UNIX path length limit
    with di.applied():  # before Ray starts; undone after (tests run this in-process)
        ray.init(
            num_cpus=os.cpu_count() or 2,
            include_dashboard=False,
            object_store_memory=1 << 28,
            _temp_dir=temp,
            log_to_driver=False,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, **serve_start_options())
            serve.run(build_floor_app(), name="floor", route_prefix="/")
            bases = {"proxy": f"http://127.0.0.1:{port}"}
            own = di.enabled and direct_ingress.direct_url("floor", "127.0.0.1", "/")
            if own:
                bases["ingress"] = own
            return measure(bases, args.requests)
        finally:
            serve.shutdown()
            ray.shutdown()
            import shutil

            shutil.rmtree(temp, ignore_errors=True)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(times: dict[str, list[float]]) -> list[dict[str, Any]]:
    return [
        {
            "route": r,
            "n": len(xs),
            "first_chunk_p50_ms": statistics.median(xs),
            "first_chunk_p90_ms": _pct(xs, 0.9),
        }
        for r, xs in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=60, help="per route")
    p.add_argument("--result-dir", default="loadtests/results")
    p.add_argument("--output", default="serve_floor.json", help="file name in --result-dir")
    p.add_argument("--no-netns", action="store_true", help="do not enter a loopback namespace")
    args = p.parse_args(argv)

    from rayfleet.cluster.serve_env import fast_path_enabled
    from rayfleet.cluster.testing import NoPrivateNetwork, call_in_ray_sandbox

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rff-home-") as home:
        try:
            times = call_in_ray_sandbox(lambda: _run(args), home, netns=not args.no_netns)
        except NoPrivateNetwork as e:
            print(f"serve_floor: {e}; use --no-netns", file=sys.stderr)
            return 2
    rows = summarize(times)
    print(f"{'route':<16}{'n':>5}{'first chunk p50 (ms)':>24}{'p90 (ms)':>12}")
    for r in rows:
        print(
            f"{r['route']:<16}{r['n']:>5}{r['first_chunk_p50_ms']:>24.2f}"
            f"{r['first_chunk_p90_ms']:>12.2f}"
        )
    out = {
        "benchmark": "serve_floor",
        "config": {**vars(args), "serve_fast_path": fast_path_enabled()},
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "results": rows,
        "times_ms": times,
    }
    path = Path(args.result_dir) / args.output
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
