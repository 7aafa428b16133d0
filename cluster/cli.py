"""The `rayfleet` command.

    rayfleet serve [CONFIG.yaml] [--address ADDR] [--host H] [--port P] [--set KEY=VALUE ...]
    rayfleet generate [--model PATH] [--max-tokens N] [--temperature T] PROMPT...
    rayfleet chat [--model PATH] MESSAGE...
    rayfleet model path
    rayfleet bench ...

Importing this module imports neither ray nor torch (a fast `--help`); each command imports
what it needs.

Ray token authentication (`rayfleet serve`): Ray 2.60 turns it on by default for a new local
cluster and writes `~/.ray/auth_token`. `rayfleet serve` keeps it on but writes no file:
it uses the token from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` when
one exists, and otherwise makes a fresh token for this run and hands it to the Ray processes
it starts through `RAY_AUTH_TOKEN` (printed at start: the dashboard asks for it).
`--ray-auth disabled` turns it off (a cluster that only listens on loopback or a private
network); an explicit `RAY_AUTH_MODE` in the environment always wins. Joining a cluster
(`--address` / `RAY_ADDRESS`) changes nothing: that cluster's settings apply.

A local cluster also runs its workers at normal priority (`RAY_worker_niceness=0` unless
set): Ray's default (15) would put the model replicas behind everything else on the machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# serve


def _parse_set(items: list[str]) -> dict[str, str]:
    from .config import key_value

    try:
        return dict(key_value(item) for item in items)
    except ValueError as e:
        raise SystemExit(f"rayfleet serve: --set {e}") from None


def serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The config fields the command line sets (dotted keys).

    With no config file and one replica, the replica's engine uses every core, as
    `configs/default.yaml` says (`engine.num_threads: 0`): the built-in default (unset)
    leaves torch at the thread count Ray gives a replica, its `num_cpus` (1), so the one
    replica on a laptop decoded on one core (one busy engine thread during a 400-token
    stream on 2 cores: 59-62 ms/token, against 48-56 with both threads)."""
    o: dict[str, object] = {}
    if args.config is None and (args.num_replicas or 1) == 1:
        o["engine.num_threads"] = 0
    if args.host is not None:
        o["server.host"] = args.host
    if args.port is not None:
        o["server.port"] = args.port
    if args.model is not None:
        o["model.path"] = args.model
    if args.served_name is not None:
        o["model.served_name"] = args.served_name
    if args.num_replicas is not None:
        o["replica.num_replicas"] = args.num_replicas
    if args.api_key:
        o["server.api_keys"] = list(args.api_key)
    if args.log_prompts:
        o["server.log_prompts"] = True
    o.update(_parse_set(args.set or []))
    return o


def load_serve_config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, overrides=serve_overrides(args))


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    p = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if p and Path(p).is_file():
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def setup_ray_auth(mode: str) -> str | None:
    """Prepare Ray token authentication for a local cluster; return a token made for this run."""
    if "RAY_AUTH_MODE" in os.environ:
        return None
    if mode == "disabled":
        os.environ["RAY_AUTH_MODE"] = "disabled"
        return None
    os.environ["RAY_AUTH_MODE"] = "token"
    if _token_available():
        return None
    import secrets

    token = secrets.token_hex(32)
    os.environ["RAY_AUTH_TOKEN"] = token  # inherited by the Ray processes; no file written
    return token


def _metrics_url(ray) -> str | None:
    try:
        ip = ray.util.get_node_ip_address()
        for node in ray.nodes():
            if node.get("Alive") and node.get("NodeManagerAddress") == ip:
                return f"http://{ip}:{node['MetricsExportPort']}/metrics"
    except Exception:
        pass
    return None


def _wait_healthy(url: str, timeout_s: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import ConfigError

    try:
        cfg = load_serve_config(args)
    except ConfigError as e:
        print(f"rayfleet serve: {e}", file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_ADDRESS")
    local = not address
    made_token = setup_ray_auth(args.ray_auth) if local else None
    if local:
        # Ray starts workers at niceness 15 (to favour its own daemons); here the replicas
        # are the workload, so they run at normal priority unless the environment says so.
        os.environ.setdefault("RAY_worker_niceness", "0")

    # Ctrl-C and SIGTERM both end the wait below and run the cleanup. SIGINT is set too, not
    # left to Python's default: a shell script that starts `rayfleet serve &` starts it
    # with SIGINT ignored, and Python then installs no handler, so `kill -INT` did nothing.
    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    from . import direct_ingress

    s = cfg.server
    # On a cluster started here, the ingress serves HTTP on `server.port` itself; Serve's
    # proxy listens elsewhere. Serve reads these settings when its processes start.
    di = direct_ingress.DirectIngressPlan(False, s.port, s.port, {})
    if local:
        try:
            di = direct_ingress.plan(
                s.port, s.proxy_port or direct_ingress.free_port(s.host), s.num_ingress_replicas
            )
        except ValueError as e:
            print(f"rayfleet serve: server.proxy_port: {e}", file=sys.stderr)
            return 2
        di.apply()

    import ray
    from ray import serve

    from .app import build_app_from_config
    from .serve_env import serve_start_options

    print(f"rayfleet: {'joining ' + address if address else 'starting a local Ray cluster'} ...")
    init_kw: dict = {"log_to_driver": not args.quiet}
    if local:
        init_kw.update(
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store_memory,
            include_dashboard=not args.no_dashboard,
            dashboard_host=args.dashboard_host,
            dashboard_port=args.dashboard_port,
        )
        if args.temp_dir:
            init_kw["_temp_dir"] = args.temp_dir
    else:
        init_kw["address"] = address
    started = False
    deployed = False
    try:
        ctx = ray.init(**init_kw)
        started = True
        signal.signal(signal.SIGTERM, _stop)  # ray.init installed its own (a bare exit)
        signal.signal(signal.SIGINT, _stop)
        # A local cluster gets rayfleet's request-path settings for Serve's proxy too.
        serve.start(
            http_options={"host": s.host, "port": di.proxy_port if local else s.port},
            **(serve_start_options() if local else {}),
        )
        print(f"rayfleet: deploying {cfg.served_model_name!r} ...")
        serve.run(
            build_app_from_config(cfg),
            name=cfg.app_name,
            route_prefix=s.route_prefix,
            blocking=False,
        )
        deployed = True
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        proxy = f"http://{host}:{di.proxy_port}{s.route_prefix.rstrip('/')}"
        _wait_healthy(proxy + "/health", 60)
        base = di.enabled and direct_ingress.direct_url(cfg.app_name, host, s.route_prefix)
        base = base or proxy
        dashboard = getattr(ctx, "dashboard_url", None)
        print()
        print(f"  model          {cfg.served_model_name}")
        print(f"  base URL       {base}/v1")
        if base != proxy:
            print(f"  Serve proxy    {proxy}/v1  (the same app, one hop more)")
        print(f"  dashboard      {'http://' + dashboard if dashboard else '(disabled)'}")
        print(f"  metrics        {_metrics_url(ray) or '(unknown)'}")
        if made_token:
            print(f"  Ray auth token {made_token}  (this run only; the dashboard asks for it)")
        print()
        print("rayfleet: serving; Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nrayfleet: shutting down ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup
        try:
            if started:
                if local:
                    serve.shutdown()
                elif deployed:
                    serve.delete(cfg.app_name)
        finally:
            if started:
                ray.shutdown()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("rayfleet: stopped.", flush=True)


# ---------------------------------------------------------------------------------------------
# offline commands


def _llm(args: argparse.Namespace):
    from rayfleet.engine import LLM

    kw = {}
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    return LLM(args.model, **kw)


def _params(args: argparse.Namespace):
    from rayfleet.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    out = llm.generate(" ".join(args.prompt), _params(args))[0]
    print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    messages = [{"role": "user", "content": " ".join(args.message)}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    out = llm.chat(messages, _params(args))[0]
    print(out.outputs[0].text)
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    from rayfleet.engine import default_model_path

    print(default_model_path())
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayfleet", description="LLM serving on Ray Serve (OpenAI-compatible API)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser(
        "serve",
        help="serve a model on a Ray cluster (local by default)",
        description="Start (or join) a Ray cluster and serve the OpenAI API. "
        "Without CONFIG: the default model on the CPU.",
    )
    s.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    s.add_argument("--address", default=None, help="join this Ray cluster (or RAY_ADDRESS)")
    s.add_argument("--host", default=None, help="HTTP host (server.host)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (server.port)")
    s.add_argument("--model", default=None, help="model folder or .gguf (model.path)")
    s.add_argument("--served-name", default=None, help="name clients use (model.served_name)")
    s.add_argument("--num-replicas", type=int, default=None, help="replica.num_replicas")
    s.add_argument("--api-key", action="append", help="accepted API key (repeatable)")
    s.add_argument("--log-prompts", action="store_true", help="log prompts in request lines")
    s.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any field, e.g. engine.block_size=32"
    )
    s.add_argument("--num-cpus", type=int, default=None, help="local cluster: CPUs (default all)")
    s.add_argument(
        "--object-store-memory", type=int, default=GIB, help="local cluster: bytes (1 GiB)"
    )
    s.add_argument("--no-dashboard", action="store_true", help="local cluster: no dashboard")
    s.add_argument("--dashboard-host", default="127.0.0.1")
    s.add_argument("--dashboard-port", type=int, default=8265)
    s.add_argument(
        "--ray-auth",
        choices=["token", "disabled"],
        default="token",
        help="local cluster: Ray token authentication (default token; RAY_AUTH_MODE wins)",
    )
    s.add_argument("--temp-dir", default=None, help="local cluster: Ray's session folder root")
    s.add_argument("--quiet", action="store_true", help="do not echo the replicas' logs")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate text offline (no Ray)")
    _add_sampling(g)
    g.add_argument("prompt", nargs="+", help="the prompt (words are joined with spaces)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="one chat turn offline, with the model's chat template")
    _add_sampling(c)
    c.add_argument("--system", default=None, help="a system message")
    c.add_argument("message", nargs="+", help="the user message (words are joined)")
    c.set_defaults(func=cmd_chat)

    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    msub.required = True
    mp = msub.add_parser("path", help="print the default model's folder (fetching it if needed)")
    mp.set_defaults(func=cmd_model_path)

    try:
        from rayfleet.loadtests.cli import add_bench_parser
    except ImportError:
        b = sub.add_parser("bench", help="load tests and benchmarks (not installed)")
        b.set_defaults(func=lambda a: _no_bench())
    else:
        add_bench_parser(sub)
    return parser


def _no_bench() -> int:
    print("rayfleet bench: rayfleet.loadtests.cli is not available", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
