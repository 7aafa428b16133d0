"""The routing policies against load: several `rayfleet bench router` results, one workload,
as one table (and a figure) ordered by request rate.

    python -m rayfleet.loadtests.router_sweep RESULT.json [RESULT.json ...]
        [--workload shared-prefix] [--output NAME] [--result-dir DIR] [--no-plot]

Why: what kv-aware placement saves is prefill work (a 512-token prefix computed once per
fleet instead of once per replica), and saved work shows up as TTFT only when there is a
queue to shorten. At light load both policies' median requests are prefix hits on an idle
replica and their medians converge; near power-of-two's capacity its extra prefills queue
and the gap opens. One rate answers "is the target met at this load"; the sweep shows where
it holds. Each input is a whole `bench router` run (policies back to back, rounds pooled);
nothing is re-measured here: the figures and verdicts are the ones each run wrote.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rayfleet.loadtests.report import load_result, save_result

BASELINE = "power-of-two"
POLICY = "kv-aware"
RATIO_TARGET = "median TTFT power-of-two / kv-aware"  # bench_router's shared-prefix target


def _value(comp: dict, key: str, policy: str) -> float | None:
    for row in comp.get("rows", []):
        if row["key"] == key:
            return row["values"].get(policy)
    return None


def sweep_point(doc: dict, workload: str, source: str = "") -> dict[str, Any]:
    """One run's figures for `workload`: its rate, both policies' TTFT, the targets (pooled
    and per round) as the run judged them."""
    comp = (doc.get("comparison") or {}).get(workload)
    params = ((doc.get("workloads") or {}).get(workload) or {}).get("params") or {}
    if comp is None or "request_rate" not in params:
        raise ValueError(f"{source or 'result'}: no {workload!r} workload in this router run")
    kv, base = _value(comp, "median_ttft_ms", POLICY), _value(comp, "median_ttft_ms", BASELINE)
    ttft_ratio = base / kv if kv and base is not None else None
    # Per round: only where the run judged this ratio (shared-prefix's target); the other
    # workloads' per-round verdicts are on other figures.
    per_round = [
        next((t["value"] for t in rnd if t["target"].startswith(RATIO_TARGET)), None)
        for rnd in comp.get("round_targets", [])
    ]
    vs_oracle = comp.get("hit_rate_vs_oracle") or {}
    return {
        "source": source,
        "date": doc.get("date"),
        "request_rate": params["request_rate"],
        "requests": params.get("requests"),
        "rounds": len(comp.get("round_targets") or []) or 1,
        "median_ttft_ms": {p: _value(comp, "median_ttft_ms", p) for p in (POLICY, BASELINE)},
        "p99_ttft_ms": {p: _value(comp, "p99_ttft_ms", p) for p in (POLICY, BASELINE)},
        "request_throughput": {
            p: _value(comp, "request_throughput", p) for p in (POLICY, BASELINE)
        },
        "hit_rate_vs_oracle": {p: vs_oracle.get(p) for p in (POLICY, BASELINE)},
        "median_ttft_ratio": ttft_ratio,
        "median_ttft_ratio_per_round": per_round,
        "targets": comp.get("targets", []),
    }


def build_sweep(paths: list[str], workload: str) -> dict[str, Any]:
    points = [sweep_point(load_result(p), workload, Path(p).name) for p in paths]
    points.sort(key=lambda x: (x["request_rate"], x["date"] or ""))
    return {"tool": "rayfleet router_sweep", "workload": workload, "points": points}


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_sweep(sweep: dict[str, Any]) -> str:
    head = (
        f"{'req/s':>6} {'kv-aware p50':>13} {'p2c p50':>9} {'p2c/kv':>7} {'per round':>13} "
        f"{'kv p99':>8} {'p2c p99':>8} {'hit/oracle':>11}  targets  source"
    )
    lines = [
        f"workload: {sweep['workload']} (TTFT in ms; p2c = power-of-two)",
        head,
        "-" * len(head),
    ]
    for p in sweep["points"]:
        m, p99, hr = p["median_ttft_ms"], p["p99_ttft_ms"], p["hit_rate_vs_oracle"]
        rounds = "/".join(_f(r, ".2f") for r in p["median_ttft_ratio_per_round"]) or "-"
        ok = "".join("P" if t["ok"] else ("F" if t["ok"] is False else "?") for t in p["targets"])
        lines.append(
            f"{p['request_rate']:>6.2f} {_f(m[POLICY], '.0f'):>13} {_f(m[BASELINE], '.0f'):>9} "
            f"{_f(p['median_ttft_ratio'], '.2f'):>7} {rounds:>13} {_f(p99[POLICY], '.0f'):>8} "
            f"{_f(p99[BASELINE], '.0f'):>8} {_f(hr[POLICY], '.3f'):>11}  {ok:<7}  {p['source']}"
        )
    lines.append("targets: P passed, F failed, each run's own, in its order")
    return "\n".join(lines)


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep["points"]
    rates = [p["request_rate"] for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for pol, style, color in ((POLICY, "o-", "C0"), (BASELINE, "s--", "C1")):
        a.plot(
            rates,
            [p["median_ttft_ms"][pol] for p in pts],
            style,
            color=color,
            label=f"{pol} median",
        )
        a.plot(
            rates, [p["p99_ttft_ms"][pol] for p in pts], style, color=color, alpha=0.35,
            label=f"{pol} p99",
        )  # fmt: skip
    a.set_yscale("log")
    a.set_xlabel("request rate (req/s)")
    a.set_ylabel("TTFT (ms)")
    a.legend(fontsize=8)
    b.plot(rates, [p["median_ttft_ratio"] for p in pts], "o-", label="pooled")
    xs = [p["request_rate"] for p in pts for r in p["median_ttft_ratio_per_round"] if r]
    ys = [r for p in pts for r in p["median_ttft_ratio_per_round"] if r]
    b.scatter(xs, ys, marker="x", color="grey", label="each round")
    if sweep["workload"] == "shared-prefix":
        b.axhline(2.0, color="red", linestyle=":", label="target 2x")
    b.set_xlabel("request rate (req/s)")
    b.set_ylabel("median TTFT, power-of-two / kv-aware")
    b.legend(fontsize=8)
    fig.suptitle(f"{sweep['workload']}: kv-aware vs power-of-two against load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", nargs="+", help="`rayfleet bench router` JSON files")
    p.add_argument("--workload", default="shared-prefix")
    p.add_argument("--result-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--output", default=None, help="file name (default: dated)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    try:
        sweep = build_sweep(args.results, args.workload)
    except (OSError, ValueError) as e:
        print(f"router_sweep: {e}", file=sys.stderr)
        return 2
    print(format_sweep(sweep))
    if not args.no_save:
        name = args.output or f"router-sweep-{args.workload}-{datetime.now():%Y%m%d-%H%M%S}.json"
        out = save_result(args.result_dir, name, sweep)
        print(f"result: {out}")
        if not args.no_plot:
            print(f"figure: {plot_sweep(sweep, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
