"""Terminal tables for `rayfleet bench`: one run's figures, and runs side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rayfleet.loadtests.metrics import LATENCY_METRICS, percentile_word

W = 64


def _line(name: str, value, fmt: str = "") -> str:
    if value is None:
        text = "-"
    elif fmt:
        text = format(value, fmt)
    else:
        text = str(value)
    return f"{name:<44} {text}"


def format_result(doc: dict) -> str:
    """A `vllm bench serve`-like summary, with a latency table and the honesty checks."""
    pct = [percentile_word(p) for p in doc.get("percentiles", [90, 99])]
    out = [f" Serving Benchmark Result: {doc.get('label', '')} ".center(W, "=")]
    out.append(_line("Successful requests:", doc["completed"]))
    out.append(_line("Failed requests:", doc["failed"]))
    for reason, n in sorted((doc.get("error_reasons") or {}).items()):
        out.append(_line(f"  {reason}:", n))
    if doc.get("max_concurrency"):
        out.append(_line("Maximum request concurrency:", doc["max_concurrency"]))
    out.append(_line("Request rate configured (RPS):", doc.get("request_rate")))
    out.append(_line("Benchmark duration (s):", doc["duration"], ".2f"))
    out.append(_line("Total input tokens:", doc["total_input_tokens"]))
    out.append(_line("Total generated tokens:", doc["total_output_tokens"]))
    out.append(_line("Request throughput (req/s):", doc["request_throughput"], ".2f"))
    if doc.get("request_goodput") is not None:
        slo = " ".join(f"{k}:{v:g}" for k, v in (doc.get("goodput_slo") or {}).items())
        out.append(_line(f"Request goodput (req/s) [{slo}]:", doc["request_goodput"], ".2f"))
    out.append(_line("Output token throughput (tok/s):", doc["output_throughput"], ".2f"))
    out.append(
        _line("Peak output token throughput (tok/s):", doc["max_output_tokens_per_s"], ".2f")
    )
    out.append(_line("Peak concurrent requests:", doc["max_concurrent_requests"]))
    out.append(_line("Total token throughput (tok/s):", doc["total_token_throughput"], ".2f"))
    out.append("-" * W)
    cols = ["mean", "median", *[f"p{p}" for p in pct]]
    out.append(f"{'Latency (ms)':<12}" + "".join(f"{c:>13}" for c in cols))
    for m in LATENCY_METRICS:
        vals = [doc.get(f"{c}_{m}_ms") for c in cols]
        out.append(
            f"{m.upper():<12}"
            + "".join(f"{v:>13.2f}" if v is not None else f"{'-':>13}" for v in vals)
        )
    out.append("-" * W)
    src = doc.get("token_count_source")
    out.append(_line("Output token counts from:", "server usage" if src == "usage" else src))
    out.append(_line("Streamed text chunks:", doc.get("total_streamed_chunks")))
    out.append(_line("Requests whose usage != chunks:", doc.get("token_count_mismatches")))
    out.append(_line("Requests whose prompt != workload length:", doc.get("prompt_len_mismatches")))
    check = doc.get("server_check")
    if check:
        for key, c in check.items():
            mark = "agrees" if c["agree"] else "DIFFERS"
            out.append(
                _line(
                    f"Server {key} (client / server):", f"{c['client']} / {c['server']:g}  {mark}"
                )
            )
    elif doc.get("server_metrics") is None:
        out.append(_line("Server counters:", "no /metrics"))
    ov = doc.get("client_overhead") or {}
    if ov:
        per_tok = ov.get("cpu_ms_per_streamed_token")
        out.append(_line("Client CPU per streamed token (ms):", per_tok, ".4f"))
        out.append(_line("Client CPU utilisation:", ov.get("cpu_utilization"), ".1%"))
        out.append(_line("Client event-loop lag p99 (ms):", ov.get("loop_lag_p99_ms"), ".2f"))
        if (ov.get("cpu_utilization") or 0) > 0.8:
            out.append("WARNING: the client was near 100% CPU; its timings include its own delay")
    out.append("=" * W)
    return "\n".join(out)


# ---------------------------------------------------------------- compare

# (key, label, higher_is_better)
COMPARE_ROWS = [
    ("completed", "Successful requests", True),
    ("failed", "Failed requests", False),
    ("duration", "Duration (s)", False),
    ("request_throughput", "Request throughput (req/s)", True),
    ("request_goodput", "Request goodput (req/s)", True),
    ("output_throughput", "Output throughput (tok/s)", True),
    ("total_token_throughput", "Total token throughput (tok/s)", True),
    ("max_output_tokens_per_s", "Peak output throughput (tok/s)", True),
]


def _latency_rows(docs: list[dict]) -> list[tuple[str, str, bool]]:
    stats = ["mean", "median"]
    for d in docs:
        for k in d:
            if k.startswith("p") and k.endswith("_ttft_ms"):
                s = k[: -len("_ttft_ms")]
                if s not in stats:
                    stats.append(s)
    rows = []
    for m in LATENCY_METRICS:
        for s in stats:
            rows.append((f"{s}_{m}_ms", f"{m.upper()} {s} (ms)", False))
    return rows


def save_result(result_dir: str | Path, filename: str, doc: dict) -> Path:
    """Write a benchmark's JSON document into `result_dir` (made if missing); its path."""
    d = Path(result_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / filename
    path.write_text(json.dumps(doc, indent=2))
    return path


def load_result(path: str | Path) -> dict:
    text = Path(path).read_text(encoding="utf-8").strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # vLLM's --append-result writes one JSON object per line: take the last one.
        return json.loads(text.splitlines()[-1])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def format_compare(docs: list[dict], names: list[str]) -> str:
    """Runs side by side; each run after the first with its ratio to the first."""
    if len(docs) < 2:
        raise ValueError("compare needs at least two result files")
    base = docs[0]
    head = f"{'metric':<34}" + "".join(f"{n[:14]:>15}" for n in names)
    head += "".join(f"{(n[:9] + '/' + names[0][:5]):>17}" for n in names[1:])
    out = [head, "-" * len(head)]
    for key, label, higher in COMPARE_ROWS + _latency_rows(docs):
        vals = [d.get(key) for d in docs]
        if all(v is None for v in vals):
            continue
        row = f"{label:<34}" + "".join(f"{_fmt(v):>15}" for v in vals)
        for v in vals[1:]:
            b = base.get(key)
            if (
                isinstance(v, int | float)
                and isinstance(b, int | float)
                and b
                and not math.isnan(b)
            ):
                r = v / b
                better = (r > 1) == higher if r != 1 else None
                mark = "" if better is None else (" +" if better else " -")
                row += f"{f'{r:.3f}x{mark}':>17}"
            else:
                row += f"{'-':>17}"
        out.append(row)
    out.append("-" * len(head))
    out.append("ratio = run / first run;  + better, - worse")
    diff = [
        k
        for k in ("workload", "request_rate", "max_concurrency")
        if len({json.dumps(d.get(k), sort_keys=True) for d in docs}) > 1
    ]
    if diff:
        out.append(f"note: the runs differ in {', '.join(diff)}")
    return "\n".join(out)
