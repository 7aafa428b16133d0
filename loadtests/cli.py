"""`rayfleet bench ...`: serve (online load against OpenAI-compatible servers), compare
(two or more result files side by side), engine (offline engine vs transformers),
overhead (the client's own cost per streamed token, against a model-less local server), and
router (the routing policies back to back on a local fleet of replicas).

`rayfleet.cluster.cli` calls `add_bench_parser(subparsers)`; `python -m
rayfleet.loadtests.cli bench ...` runs the same commands without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from rayfleet.loadtests.workloads import WORKLOADS


def _rate(value: str) -> float:
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {value}")
    return v


def _positive_int(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def add_serve_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target")
    t.add_argument(
        "--base-url",
        nargs="+",
        default=["http://127.0.0.1:8000"],
        help="one or more servers, run back to back with the same workload",
    )
    t.add_argument(
        "--label", nargs="+", default=None, help="a name per --base-url (for files and tables)"
    )
    t.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions"
    )
    t.add_argument(
        "--backend",
        choices=["openai", "openai-chat"],
        default=None,
        help="vLLM-style alias: openai-chat means --endpoint /v1/chat/completions",
    )
    t.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    t.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    t.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or .gguf (default: --model if a folder, else the default model)",
    )
    t.add_argument("--request-timeout", type=float, default=600.0, help="seconds without data")

    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload", "--dataset-name", dest="workload", choices=WORKLOADS, default="random"
    )
    w.add_argument(
        "--dataset-path", default=None, help="jsonl: the file (JSONL, JSON array, ShareGPT)"
    )
    w.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=None,
        help="sessions to send (multi-turn: conversations). Default: the workload's "
        "size, or unbounded with --duration",
    )
    w.add_argument("--input-len", type=_positive_int, default=256)
    w.add_argument(
        "--output-len", type=_positive_int, default=None, help="default 128 (jsonl: the file's)"
    )
    w.add_argument(
        "--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1-r)..len*(1+r)"
    )
    w.add_argument("--num-groups", type=_positive_int, default=8, help="shared-prefix: G")
    w.add_argument("--prompts-per-group", type=_positive_int, default=8, help="shared-prefix: P")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: shared tokens")
    w.add_argument(
        "--suffix-len", type=int, default=64, help="shared-prefix: tokens of each prompt's own"
    )
    w.add_argument(
        "--hot-fraction",
        type=float,
        default=0.8,
        help="skewed: share of requests that start with the one hot prefix",
    )
    w.add_argument(
        "--turns", type=_positive_int, default=4, help="multi-turn: turns per conversation"
    )
    w.add_argument(
        "--system-prompt-len", type=int, default=0, help="multi-turn: system prompt tokens"
    )
    w.add_argument(
        "--think-time-ms", type=float, default=0.0, help="multi-turn: pause between turns"
    )
    w.add_argument(
        "--shuffle", action="store_true", help="jsonl: shuffle the file's records (seeded)"
    )
    w.add_argument("--seed", type=int, default=0)

    load = p.add_argument_group("load shape")
    load.add_argument(
        "--request-rate",
        type=_rate,
        default=math.inf,
        help="sessions per second (Poisson); inf: all at once",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps: 1 Poisson, <1 burstier, >1 steadier",
    )
    load.add_argument("--max-concurrency", type=_positive_int, default=None)
    load.add_argument(
        "--duration", type=float, default=None, help="stop sending after this many seconds"
    )
    load.add_argument("--num-warmups", type=int, default=0, help="warm-up requests, not counted")

    s = p.add_argument_group("sampling")
    s.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask for exactly the output length (default: on for random, shared-prefix, skewed)",
    )
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument(
        "--extra-body", type=json.loads, default=None, help="JSON merged into every request"
    )

    r = p.add_argument_group("figures and output")
    r.add_argument(
        "--slo",
        "--goodput",
        dest="slo",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="goodput SLOs, e.g. --slo ttft:500 tpot:50 e2el:10000",
    )
    r.add_argument(
        "--metric-percentiles", default="90,99", help="comma-separated, besides the median"
    )
    r.add_argument("--result-dir", default=None, help="default: loadtests/results")
    r.add_argument("--result-filename", default=None)
    r.add_argument(
        "--save-detailed", action="store_true", help="keep per-request lists in the JSON"
    )
    r.add_argument("--no-save", action="store_true", help="print only; write no JSON or PNG")
    r.add_argument("--no-plot", action="store_true", help="write no PNG")
    r.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE")
    r.add_argument("--disable-tqdm", action="store_true")
    r.add_argument(
        "--metrics-url",
        nargs="+",
        default=None,
        help="Prometheus endpoint per --base-url whose counters are checked against the "
        "client's (default: BASE_URL/metrics; rayfleet: the Ray metrics agent URL that "
        "`rayfleet serve` prints; 'none' to skip)",
    )
    r.add_argument(
        "--metrics-wait",
        type=float,
        default=15.0,
        help="seconds to wait for the server's counters to catch up",
    )
    r.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")


def _default_label(url: str) -> str:
    u = urlparse(url)
    return f"{u.hostname or 'server'}-{u.port or (443 if u.scheme == 'https' else 80)}"


def _resolve_tokenizer(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.model and Path(args.model).exists():
        return args.model
    from rayfleet.loadtests.workloads import default_tokenizer_path

    return default_tokenizer_path()


# The arguments that define each workload, recorded in the result file.
_WORKLOAD_FIELDS: dict[str, tuple[str, ...]] = {
    "random": ("input_len", "output_len", "range_ratio"),
    "multi-turn": (
        "input_len", "output_len", "range_ratio", "turns", "system_prompt_len", "think_time_ms"
    ),
    "shared-prefix": ("num_groups", "prompts_per_group", "prefix_len", "suffix_len", "output_len"),
    "skewed": ("hot_fraction", "prefix_len", "suffix_len", "output_len"),
    "jsonl": ("dataset_path",),
}  # fmt: skip


def run_serve(args) -> int:
    from rayfleet.loadtests.metrics import parse_slo
    from rayfleet.loadtests.plot import plot_runs, run_entry
    from rayfleet.loadtests.report import format_compare, format_result
    from rayfleet.loadtests.serve_bench import (
        RESULTS_DIR,
        LoadShape,
        benchmark_target,
        result_document,
        result_filename,
        write_json,
    )
    from rayfleet.loadtests.workloads import (
        TokenSource,
        build_workload,
        load_tokenizer,
        random_workload,
    )

    if args.backend == "openai-chat":
        args.endpoint = "/v1/chat/completions"
    from rayfleet.loadtests.client import is_chat_endpoint

    chat = is_chat_endpoint(args.endpoint)
    slo = parse_slo(args.slo)
    percentiles = [float(x) for x in args.metric_percentiles.split(",") if x.strip()]
    labels = args.label or [_default_label(u) for u in args.base_url]
    if len(labels) != len(args.base_url):
        raise ValueError(
            f"--label needs one name per --base-url ({len(args.base_url)}), got {labels}"
        )
    metadata = {}
    for item in args.metadata or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--metadata wants KEY=VALUE, got {item!r}")
        metadata[key.strip()] = value.strip()
    args.output_len_set = args.output_len is not None
    if args.output_len is None:
        args.output_len = 128
    ignore_eos = args.ignore_eos
    if ignore_eos is None:
        ignore_eos = args.workload in ("random", "shared-prefix", "skewed")
    extra = dict(args.extra_body or {})
    for key in ("temperature", "top_p", "top_k"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)

    tok_path = _resolve_tokenizer(args)
    tokenizer = load_tokenizer(tok_path)
    sessions = build_workload(args, tokenizer, chat)
    warmups = []
    if args.num_warmups > 0:
        src = TokenSource(tokenizer, seed=args.seed + 7919)
        warmups = random_workload(src, args.num_warmups, args.input_len, args.output_len, 0.0, chat)
    num_sessions = args.num_prompts
    if num_sessions is None and args.duration is None:
        num_sessions = len(sessions)
    shape = LoadShape(
        args.request_rate,
        args.burstiness,
        args.max_concurrency,
        num_sessions,
        args.duration,
        args.think_time_ms / 1000.0,
        args.seed,
    )
    shape.validate()
    workload = {
        "name": args.workload,
        "sessions_in_pool": len(sessions),
        "requests_in_pool": sum(len(s.turns) for s in sessions),
        "seed": args.seed,
        "ignore_eos": ignore_eos,
    }
    workload.update({f: getattr(args, f) for f in _WORKLOAD_FIELDS.get(args.workload, ())})

    result_dir = Path(args.result_dir) if args.result_dir else RESULTS_DIR
    metrics_urls = args.metrics_url or [None] * len(args.base_url)
    if len(metrics_urls) != len(args.base_url):
        raise ValueError(f"--metrics-url needs one URL per --base-url ({len(args.base_url)})")
    docs, entries, paths = [], [], []
    worst = 0
    for url, label, murl in zip(args.base_url, labels, metrics_urls, strict=True):
        print(
            f"[{label}] {url}{args.endpoint}: {args.workload}, {workload['requests_in_pool']} requests "
            f"in the pool, rate {args.request_rate}, max concurrency {args.max_concurrency}"
        )
        res, outcomes = asyncio.run(
            benchmark_target(
                url,
                sessions,
                warmups,
                shape,
                endpoint=args.endpoint,
                model=args.model,
                api_key=args.api_key,
                ignore_eos=ignore_eos,
                extra_body=extra,
                tokenizer=tokenizer,
                percentiles=percentiles,
                slo=slo,
                disable_tqdm=args.disable_tqdm,
                metrics_wait_s=args.metrics_wait,
                metrics_url=murl,
                timeout_s=args.request_timeout,
                label=label,
            )
        )
        doc = result_document(
            res,
            outcomes,
            label=label,
            base_url=url,
            endpoint=args.endpoint,
            tokenizer_id=tok_path,
            shape=shape,
            workload=workload,
            slo=slo,
            percentiles=percentiles,
            save_detailed=args.save_detailed,
            metadata=metadata,
        )
        print(format_result(doc))
        if doc["failed"]:
            worst = max(worst, 1)
        docs.append(doc)
        entries.append(run_entry(label, outcomes, doc))
        if not args.no_save:
            fname = args.result_filename
            if fname and len(args.base_url) > 1:
                fname = f"{Path(fname).stem}-{label}{Path(fname).suffix or '.json'}"
            path = write_json(doc, result_filename(doc, result_dir, fname))
            paths.append(path)
            print(f"result: {path}")
            if not args.no_plot:
                png = plot_runs(
                    [entries[-1]], path.with_suffix(".png"), f"{label}: {args.workload}"
                )
                print(f"figure: {png}")
    if len(docs) > 1:
        print(format_compare(docs, labels))
        if not args.no_save and not args.no_plot:
            png = paths[0].with_name(f"compare-{'-vs-'.join(labels)}-{docs[0]['date']}.png")
            plot_runs(entries, png, f"{args.workload}: {' vs '.join(labels)}")
            print(f"figure: {png}")
    if any(d["completed"] == 0 for d in docs):
        return 1
    return worst if args.fail_on_error else 0


def run_compare(args) -> int:
    from rayfleet.loadtests.plot import plot_runs, run_entry
    from rayfleet.loadtests.report import format_compare, load_result

    docs = [load_result(p) for p in args.results]
    names = [d.get("label") or Path(p).stem for d, p in zip(docs, args.results, strict=True)]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    print(format_compare(docs, names))
    if args.plot:
        png = plot_runs([run_entry(n, doc=d) for n, d in zip(names, docs, strict=True)], args.plot)
        print(f"figure: {png}")
    return 0


def _run_engine(args) -> int:
    from rayfleet.loadtests import bench_engine

    return bench_engine.run(args)


def _run_overhead(args) -> int:
    from rayfleet.loadtests import overhead

    return overhead.run(args)


def _run_router(args) -> int:
    from rayfleet.loadtests import bench_router

    return bench_router.run(args)


def _guarded(fn):
    """Bad input (ValueError) ends the command with its message and exit code 2."""

    def run(args) -> int:
        try:
            return fn(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (with serve / compare / engine / overhead / router) to a CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: serving load, engine, comparisons",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = bench.add_subparsers(
        dest="bench_command", metavar="{serve,compare,engine,overhead,router}"
    )
    sub.required = True

    serve = sub.add_parser("serve", help="online load against OpenAI-compatible servers")
    add_serve_args(serve)
    serve.set_defaults(func=_guarded(run_serve))

    compare = sub.add_parser("compare", help="result files side by side, with ratios")
    compare.add_argument("results", nargs="+", help="two or more JSON result files")
    compare.add_argument(
        "--plot", default=None, help="also write a PNG here (CDFs need --save-detailed runs)"
    )
    compare.set_defaults(func=_guarded(run_compare))

    from rayfleet.loadtests import bench_engine, overhead

    engine = sub.add_parser("engine", help="offline: rayfleet engine vs transformers generate")
    bench_engine.add_args(engine)
    engine.set_defaults(func=_guarded(_run_engine))

    ov = sub.add_parser("overhead", help="the client's own cost per streamed token (no model)")
    overhead.add_args(ov)
    ov.set_defaults(func=_guarded(_run_overhead))

    from rayfleet.loadtests import bench_router

    router = sub.add_parser(
        "router",
        help="routing policies back to back on a local fleet (kv-aware vs power-of-two)",
        description=bench_router.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_router.add_args(router)
    router.set_defaults(func=_guarded(_run_router))
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayfleet")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
