"""What the serving path costs: TTFT and inter-token latency through HTTP + Ray Serve versus
the same engine called directly, on the default model, at concurrency 1 and 16.

    python -m rayfleet.loadtests.bench_serving_path [--concurrency 1 16] [--max-tokens 32]
        [--compare-defaults | --compare-stream] [--requests 30 96] [--engine-threads N]
        [--output NAME.json]

One process holds both: an `AsyncLLMEngine` driven in-process (the floor) and a local Ray
cluster (inside a loopback-only network namespace when run as root, HOME in a temporary folder,
nothing left behind) serving `rayfleet.cluster.app` with the same engine config, its replica
holding all CPUs (the same torch thread count; `--engine-threads N` gives both engines N
threads, and with fewer than the cores the serving path's own CPU no longer comes out of the
engine's). HTTP reaches the app two ways, as `rayfleet serve` sets it up: on the ingress
replica's own port (direct ingress, `cluster/direct_ingress.py`) and through Serve's HTTP proxy
(the path under KubeRay's defaults). The paths take turns, in rounds of `concurrency` requests
each (which one goes first rotates), on random token-id prompts of the same length, each path
its own (no prefix-cache hits: the two HTTP paths share one replica), `ignore_eos`, fixed
`max_tokens`, greedy. Taking turns matters on a shared machine: every path sees the same
background load, which would otherwise swamp a millisecond-sized difference. Serve runs with
rayfleet's request-path settings (`cluster/serve_env.py`, as `rayfleet serve` does);
`RAYFLEET_SERVE_FAST_PATH=0` measures Serve's defaults instead (proxy only), and
`--compare-defaults` measures both in one run: a second copy of the app built with Serve's
defaults takes its turns too (through the proxy, shared, which then keeps Serve's defaults for
both: its settings are cluster-wide), so the two are compared under the same background load.

TTFT: request sent -> first chunk carrying tokens. ITL: gaps between consecutive chunks that
carry tokens (per chunk, as vLLM's benchmark_serving counts it). TPOT: (latency - TTFT) /
(tokens - 1) per request. The overhead rows are serving minus direct, of the medians and of
the per-pair differences; "engine TPOT" splits the TPOT difference: the replica's engine's own
TPOT (first token -> finished, from its request log) minus the direct engine's, i.e. how much
slower the same engine steps as a replica than in this process (the cluster is up for both;
the serving path's own CPU, client included, comes out of the engine's cores), before any
token leaves the replica. Prints a table and writes JSON (`--result-dir`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rayfleet.loadtests.report import save_result


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(path: str, conc: int, results: list[dict], wall: float) -> dict[str, Any]:
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in results)
    return {
        "path": path,
        "concurrency": conc,
        "requests": len(results),
        "output_tokens": tokens,
        "ttft_ms": {
            "p50": _pct(ttft, 0.5) * 1e3,
            "p90": _pct(ttft, 0.9) * 1e3,
            "p99": _pct(ttft, 0.99) * 1e3,
            "mean": statistics.fmean(ttft) * 1e3,
        },
        "itl_ms": {
            "p50": _pct(itl, 0.5) * 1e3,
            "p90": _pct(itl, 0.9) * 1e3,
            "p99": _pct(itl, 0.99) * 1e3,
            "mean": statistics.fmean(itl) * 1e3,
        },
        "tpot_ms": {"p50": _pct(tpot, 0.5) * 1e3, "mean": statistics.fmean(tpot) * 1e3},
        "tokens_per_chunk": tokens / max(1, len(itl) + len(results)),
        "output_tok_s": tokens / wall,
        "wall_s": wall,
    }


def make_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = 100, max(200, min(vocab, 40000) - 1)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Phase 1: the engine, called directly


async def _direct_level(engine, prompts, conc: int, max_tokens: int, tag: str) -> list[dict]:
    from rayfleet.engine import SamplingParams

    sem = asyncio.Semaphore(conc)

    async def one(i: int, ids: list[int]) -> dict:
        async with sem:
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            first = last = None
            itl: list[float] = []
            ntok = 0
            async for out in engine.generate(ids, sp, f"{tag}-{i}"):
                k = sum(len(o.token_ids) for o in out.outputs)
                if not k:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                ntok += k
            return {"ttft": first - t0, "itl": itl, "latency": last - t0, "tokens": ntok}

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


# ---------------------------------------------------------------------------------------------
# Phase 2: HTTP + Ray Serve


async def _http_level(base: str, model: str, prompts, conc: int, max_tokens: int) -> list[dict]:
    """The same requests over HTTP, with a lean aiohttp client (the one `loadtests/client.py`
    uses): the load generator shares this machine's CPUs with the server, so what it spends
    per token slows the engine it measures (httpx took about twice the CPU per token)."""
    import aiohttp

    sem = asyncio.Semaphore(conc)
    connector = aiohttp.TCPConnector(limit=conc + 4, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def one(ids: list[int]) -> dict:
            body = json.dumps(
                {
                    "model": model,
                    "prompt": ids,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ).encode()
            headers = {"Content-Type": "application/json"}
            async with sem:
                t0 = time.perf_counter()
                first = last = None
                itl: list[float] = []
                ntok = 0
                rid = None
                buf = b""
                async with session.post(base + "/v1/completions", data=body, headers=headers) as r:
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
                    async for piece in r.content.iter_any():
                        now = time.perf_counter()  # every event of one read arrived now
                        buf += piece
                        while (end := buf.find(b"\n\n")) >= 0:
                            event, buf = buf[:end], buf[end + 2 :]
                            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                                continue
                            obj = json.loads(event[6:])
                            rid = rid or obj.get("id")
                            if obj.get("usage"):
                                ntok = obj["usage"]["completion_tokens"]
                            if not obj.get("choices") or not obj["choices"][0].get("text"):
                                continue
                            if first is None:
                                first = now
                            else:
                                itl.append(now - last)
                            last = now
                return {
                    "ttft": first - t0,
                    "itl": itl,
                    "latency": last - t0,
                    "tokens": ntok,
                    "id": rid,
                }

        return await asyncio.gather(*(one(p) for p in prompts))


def engine_records(temp: str) -> dict[str, dict[str, Any]]:
    """request id -> the replica's request log line (the engine's own TTFT, arrival -> first
    token, its total time and output tokens)."""
    out: dict[str, dict[str, Any]] = {}
    logs = Path(temp) / "session_latest" / "logs" / "serve"
    for f in logs.glob("replica_*LLMServer*.log"):
        for line in f.read_text(errors="replace").splitlines():
            if "rayfleet.request " in line:
                rec = json.loads(line.split("rayfleet.request ", 1)[1])
                if rec.get("ttft_s") is not None:
                    out[rec["request_id"]] = rec
    return out


def engine_tpot(rec: dict[str, Any]) -> float | None:
    """The engine's own time per output token in the replica (first token -> finished)."""
    n = rec.get("output_tokens") or 0
    return (rec["total_s"] - rec["ttft_s"]) / (n - 1) if n > 1 else None


SERVING = "HTTP, direct ingress"  # what `rayfleet serve` sets up
SERVING_PROXY = "HTTP + Serve proxy"  # the same app through Serve's proxy (as under KubeRay)
SERVING_DEFAULTS = "HTTP + Serve defaults"
SERVING_STREAM = "HTTP, Serve stream"  # direct ingress, tokens as Serve stream items


def start_serving(engine_cfg: dict, args) -> tuple[list[tuple[str, str]], str]:
    """Start Ray + Serve with the app; return ([(path label, base URL)], Ray temp folder).

    As `rayfleet serve` does, the ingress serves HTTP on its own port (`direct_ingress`);
    the same app is also measured through Serve's proxy. `--compare-defaults` deploys the
    same app a second time, built with Serve's defaults (`RAYFLEET_SERVE_FAST_PATH=0`), under
    /serve-defaults, and leaves the proxy (shared, its settings are cluster-wide) at Serve's
    defaults too (and no direct ingress). `--compare-stream` deploys it a second time with
    `server.token_channel: false` (the replica's tokens travel as the handle stream's items
    instead of over the ingress's token channel), on its own direct-ingress port."""
    import ray
    from ray import serve
    from rayfleet.cluster import direct_ingress
    from rayfleet.cluster.app import build_app
    from rayfleet.cluster.serve_env import FAST_PATH_VAR, serve_start_options
    from rayfleet.cluster.testing import free_port

    port = free_port()
    napps = 2 if args.compare_defaults or args.compare_stream else 1
    di = None
    if not args.compare_defaults:  # one ingress port per app
        di = direct_ingress.plan(free_port(), port, num_ingress_replicas=napps)
    if di is not None:
        di.apply()  # before Ray starts: Serve reads it when its processes start

    ncpu = args.num_cpus or os.cpu_count() or 2
    temp = tempfile.mkdtemp(prefix="rfb-", dir="/tmp")  # AF_UNIX path length limit
    # Ray starts workers at niceness 15; the direct engine runs at 0. On a busy machine that
    # alone slows the replica (as `rayfleet serve` does, run both at the same priority).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        num_cpus=ncpu * napps,  # logical: each replica holds `ncpu` (its torch threads)
        include_dashboard=False,
        object_store_memory=1 << 30,
        _temp_dir=temp,
        log_to_driver=False,
    )
    # Serve's proxy with the settings `rayfleet serve` gives a local cluster (`serve_env`).
    proxy = {} if args.compare_defaults else serve_start_options()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, **proxy)
    app_cfg = {
        "engine": engine_cfg,
        "replica": {"max_ongoing_requests": 128, "resources": {"num_cpus": ncpu}},
    }
    base = f"http://127.0.0.1:{port}"
    serve.run(build_app(app_cfg), name="rayfleet", route_prefix="/")
    own = di is not None and di.enabled and direct_ingress.direct_url("rayfleet", "127.0.0.1", "/")
    apps = [(SERVING, own), (SERVING_PROXY, base)] if own else [(SERVING_PROXY, base)]
    if args.compare_defaults:
        saved = os.environ.get(FAST_PATH_VAR)
        os.environ[FAST_PATH_VAR] = "0"
        try:
            app = build_app(app_cfg)
        finally:
            if saved is None:
                os.environ.pop(FAST_PATH_VAR, None)
            else:
                os.environ[FAST_PATH_VAR] = saved
        serve.run(app, name="rayfleet-defaults", route_prefix="/serve-defaults")
        apps.append((SERVING_DEFAULTS, base + "/serve-defaults"))
    if args.compare_stream and own:
        stream_cfg = {**app_cfg, "server": {"token_channel": False}}
        serve.run(build_app(stream_cfg), name="rayfleet-stream", route_prefix="/serve-stream")
        url = direct_ingress.direct_url("rayfleet-stream", "127.0.0.1", "/serve-stream")
        if url:
            apps.insert(1, (SERVING_STREAM, url))
    return apps, temp


def stop_serving(temp: str) -> None:
    import shutil

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


async def paired(engine_cfg: dict, apps, temp: str, levels, args) -> tuple[list, list, list]:
    import httpx
    from rayfleet.engine import AsyncLLMEngine, EngineConfig

    model = httpx.get(apps[0][1] + "/v1/models").json()["data"][0]["id"]
    engine = AsyncLLMEngine.from_config(EngineConfig(**engine_cfg))
    try:
        vocab = len(engine.tokenizer)
        warm = make_prompts(vocab, 2, args.prompt_len, 999)
        await _direct_level(engine, warm, 2, 8, "warm")
        for _, base in apps:
            await _http_level(base, model, warm, 2, 8)
        paths = [None, *apps]  # None: the engine, directly
        direct_rows, serving_rows, pairs = [], [], []
        for conc, n in levels:
            prompts = make_prompts(vocab, n, args.prompt_len, args.seed + conc)
            # Each HTTP path its own prompts (same lengths): two entry points to one app share
            # its replica's prefix cache, where the second would hit what the first stored.
            own = {
                label: make_prompts(vocab, n, args.prompt_len, args.seed + conc + 1000 * (j + 1))
                for j, (label, _) in enumerate(apps)
            }
            res: dict[str | None, list[dict]] = {None: [], **{label: [] for label, _ in apps}}
            wall: dict[str | None, float] = dict.fromkeys(res, 0.0)
            for r, i in enumerate(range(0, n, conc)):
                batch = prompts[i : i + conc]
                k = r % len(paths)  # each path goes first in turn
                for path in paths[k:] + paths[:k]:
                    t0 = time.perf_counter()
                    if path is None:
                        got = await _direct_level(
                            engine, batch, conc, args.max_tokens, f"c{conc}-{i}"
                        )
                    else:
                        mine = own[path[0]][i : i + conc]
                        got = await _http_level(path[1], model, mine, conc, args.max_tokens)
                    label = None if path is None else path[0]
                    res[label] += got
                    wall[label] += time.perf_counter() - t0
            d_res = res[None]
            direct_rows.append(summarize("engine (direct)", conc, d_res, wall[None]))
            print(_row(direct_rows[-1]), flush=True)
            for label, _ in apps:
                s_res = res[label]
                serving_rows.append(summarize(label, conc, s_res, wall[label]))
                pd = [(s["ttft"] - d["ttft"]) * 1e3 for d, s in zip(d_res, s_res, strict=True)]
                pi = [
                    (_pct(s["itl"], 0.5) - _pct(d["itl"], 0.5)) * 1e3
                    for d, s in zip(d_res, s_res, strict=True)
                ]
                pairs.append(
                    {"path": label, "concurrency": conc, "ttft_diff_p50_ms": _pct(pd, 0.5),
                     "itl_p50_diff_p50_ms": _pct(pi, 0.5), "_serving": s_res}
                )  # fmt: skip
                print(_row(serving_rows[-1]), flush=True)
        await asyncio.sleep(2.0)  # let the replicas' log lines reach the files
        eng = engine_records(temp)
        direct_tpot = {r["concurrency"]: r["tpot_ms"]["p50"] for r in direct_rows}
        for p in pairs:
            res_p = p.pop("_serving")
            mine = [(r, eng[r["id"]]) for r in res_p if r["id"] in eng]
            path_ms = [(r["ttft"] - e["ttft_s"]) * 1e3 for r, e in mine]
            p["path_ttft_p50_ms"] = _pct(path_ms, 0.5)
            p["path_ttft_n"] = len(path_ms)
            # Where the TPOT difference arises: the engine itself running slower in the
            # replica's process (CPU shared with the cluster), or the way to the client.
            tpots = [t * 1e3 for _, e in mine if (t := engine_tpot(e)) is not None]
            p["replica_engine_tpot_p50_ms"] = _pct(tpots, 0.5)
            p["replica_engine_minus_direct_tpot_ms"] = (
                _pct(tpots, 0.5) - direct_tpot[p["concurrency"]]
            )
        return direct_rows, serving_rows, pairs
    finally:
        await engine.shutdown()


def _tokenizer():
    from rayfleet.cluster.config import RayfleetConfig
    from rayfleet.cluster.ingress import load_tokenizer

    return load_tokenizer(RayfleetConfig())


# ---------------------------------------------------------------------------------------------
# Report

_HEADER = (
    f"{'path':<21} {'conc':>4} {'reqs':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
    f"{'ITL p99':>8} {'TPOT p50':>9} {'tok/chunk':>9} {'tok/s':>7}"
)


def _row(r: dict) -> str:
    return (
        f"{r['path']:<21} {r['concurrency']:>4} {r['requests']:>4} "
        f"{r['ttft_ms']['p50']:>9.1f} {r['ttft_ms']['p99']:>9.1f} {r['itl_ms']['p50']:>8.2f} "
        f"{r['itl_ms']['p99']:>8.2f} {r['tpot_ms']['p50']:>9.2f} {r['tokens_per_chunk']:>9.2f} "
        f"{r['output_tok_s']:>7.1f}"
    )


def report(direct: list[dict], serving: list[dict], pairs: list[dict]) -> list[dict]:
    print()
    print("milliseconds")
    print(_HEADER)
    for r in direct + serving:
        print(_row(r))
    print()
    print("overhead, serving - direct (ms): of the medians; median of the per-pair differences;")
    print("path TTFT = client TTFT - the engine's own TTFT (arrival -> first token), per request;")
    print("engine TPOT = the replica's engine's own TPOT (from its request log) - direct TPOT")
    print(f"{'path':<21} {'conc':>4} {'TTFT p50':>9} {'ITL p50':>8} {'TPOT p50':>9} "
          f"{'pair TTFT':>10} {'pair ITL':>9} {'path TTFT':>10} {'engine TPOT':>12}")  # fmt: skip
    deltas = []
    for s in serving:
        d = next((x for x in direct if x["concurrency"] == s["concurrency"]), None)
        if d is None:
            continue
        pair = next(
            (x for x in pairs if x["concurrency"] == s["concurrency"] and x["path"] == s["path"]),
            {},
        )
        nan = float("nan")
        delta = {
            "path": s["path"],
            "concurrency": d["concurrency"],
            "ttft_p50_ms": s["ttft_ms"]["p50"] - d["ttft_ms"]["p50"],
            "itl_p50_ms": s["itl_ms"]["p50"] - d["itl_ms"]["p50"],
            "tpot_p50_ms": s["tpot_ms"]["p50"] - d["tpot_ms"]["p50"],
            "pairwise_ttft_p50_ms": pair.get("ttft_diff_p50_ms", nan),
            "pairwise_itl_p50_ms": pair.get("itl_p50_diff_p50_ms", nan),
            "path_ttft_p50_ms": pair.get("path_ttft_p50_ms", nan),
            "replica_engine_tpot_diff_ms": pair.get("replica_engine_minus_direct_tpot_ms", nan),
        }
        deltas.append(delta)
        print(f"{delta['path']:<21} {delta['concurrency']:>4} {delta['ttft_p50_ms']:>+9.1f} "
              f"{delta['itl_p50_ms']:>+8.2f} {delta['tpot_p50_ms']:>+9.2f} "
              f"{delta['pairwise_ttft_p50_ms']:>+10.1f} {delta['pairwise_itl_p50_ms']:>+9.2f} "
              f"{delta['path_ttft_p50_ms']:>+10.1f} "
              f"{delta['replica_engine_tpot_diff_ms']:>+12.2f}")  # fmt: skip
    return deltas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument(
        "--requests",
        type=int,
        nargs="+",
        default=None,
        help="requests per level (default: 8 at concurrency 1, 2x concurrency above)",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-interval", type=float, default=0.0, help="engine.stream_interval_s")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    p.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="torch threads of both engines, direct and replica (default: every core); "
        "fewer than the cores leaves the serving path a core of its own",
    )
    p.add_argument("--result-dir", default="loadtests/results")
    p.add_argument("--output", default="serving_path.json", help="file name in --result-dir")
    p.add_argument(
        "--compare-defaults",
        action="store_true",
        help="also serve the app with Serve's default settings (and the proxy's), taking turns",
    )
    p.add_argument(
        "--compare-stream",
        action="store_true",
        help="also serve the app with its token channel off (tokens as Serve stream items), "
        "taking turns",
    )
    p.add_argument("--no-netns", action="store_true", help="do not enter a loopback namespace")
    args = p.parse_args(argv)
    if args.compare_defaults and args.compare_stream:
        p.error("--compare-defaults and --compare-stream each need a second app: pick one")

    reqs = args.requests or [10 if c == 1 else 2 * c for c in args.concurrency]
    if len(reqs) != len(args.concurrency):
        p.error("--requests needs one value per --concurrency")
    levels = list(zip(args.concurrency, reqs, strict=True))
    engine_cfg = {
        "device": "cpu",
        "dtype": "float32",
        "max_model_len": 1024,
        "num_kv_blocks": 1024,
        "max_num_seqs": 64,
        "stream_interval_s": args.stream_interval,
    }
    if args.engine_threads is not None:
        engine_cfg["num_threads"] = args.engine_threads

    from rayfleet.cluster.serve_env import fast_path_enabled
    from rayfleet.cluster.testing import NoPrivateNetwork, call_in_ray_sandbox

    def run() -> tuple[list, list, list]:
        apps, temp = start_serving(engine_cfg, args)
        try:
            print(_HEADER, flush=True)
            return asyncio.run(paired(engine_cfg, apps, temp, levels, args))
        finally:
            stop_serving(temp)

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rfb-home-") as home:
        try:
            direct, serving, pairs = call_in_ray_sandbox(run, home, netns=not args.no_netns)
        except NoPrivateNetwork as e:
            print(f"bench: {e}; use --no-netns", file=sys.stderr)
            return 2
    deltas = report(direct, serving, pairs)
    out = {
        "benchmark": "serving_path",
        "config": {
            **vars(args),
            "levels": levels,
            "engine": engine_cfg,
            "serve_fast_path": fast_path_enabled(),  # RAYFLEET_SERVE_FAST_PATH (serve_env)
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "results": direct + serving,
        "overhead": deltas,
    }
    print(f"\nwrote {save_result(args.result_dir, args.output, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
