"""The PNG figure of `rayfleet bench serve`: latency CDFs and throughput over time.

One line per run, so a run against rayfleet and one against a peer overlay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rayfleet.loadtests.metrics import RequestOutcome, timeline


def series_from_outcomes(outcomes: list[RequestOutcome]) -> dict[str, list[float]]:
    ok = [o for o in outcomes if o.success]
    return {
        "ttft": [o.ttft for o in ok],
        "tpot": [o.tpot for o in ok if o.num_output_tokens > 1],
        "itl": [g for o in ok for g in o.itl],
        "e2el": [o.latency for o in ok],
    }


def series_from_document(doc: dict) -> dict[str, list[float]] | None:
    """Per-request series from a result file saved with --save-detailed, else None."""
    if "ttfts" not in doc:
        return None
    ok = [i for i, e in enumerate(doc.get("errors", [])) if not e]
    ttft = [doc["ttfts"][i] for i in ok]
    lat = [doc["latencies"][i] for i in ok]
    outl = [doc["output_lens"][i] for i in ok]
    return {
        "ttft": ttft,
        "tpot": [(e - t) / (n - 1) for t, e, n in zip(ttft, lat, outl, strict=True) if n > 1],
        "itl": [g for i in ok for g in doc["itls"][i]],
        "e2el": lat,
    }


def plot_runs(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """runs: [{"label", "series" (seconds, or None), "timeline"}] -> PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    cdf_axes = {"ttft": axes[0][0], "tpot": axes[0][1], "itl": axes[0][2], "e2el": axes[1][0]}
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
    for run in runs:
        series = run.get("series")
        if not series:
            continue
        for key, ax in cdf_axes.items():
            vals = np.sort(np.asarray(series.get(key) or [], dtype=float)) * 1000.0
            if vals.size == 0:
                continue
            ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=run["label"])
    for key, ax in cdf_axes.items():
        ax.set_title(f"{names[key]} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    ax_tok, ax_conc = axes[1][1], axes[1][2]
    bucket = 1.0
    for run in runs:
        tl = run.get("timeline") or {}
        if tl.get("t"):
            b = tl.get("bucket_s", 1.0)
            t = [*tl["t"], tl["t"][-1] + b]  # close the last bucket
            ax_tok.step(
                t,
                [*tl["output_tokens_per_s"], tl["output_tokens_per_s"][-1]],
                where="post",
                label=run["label"],
            )
            ax_conc.step(
                t,
                [*tl["concurrent_requests"], tl["concurrent_requests"][-1]],
                where="post",
                label=run["label"],
            )
            bucket = b
    ax_tok.set_title(f"Output tokens/s over time ({bucket:g} s buckets)")
    ax_conc.set_title(f"Requests in flight over time ({bucket:g} s mean)")
    for ax in (ax_tok, ax_conc):
        ax.set_xlabel("s since start")
        ax.grid(alpha=0.3)
    for ax in [*cdf_axes.values(), ax_tok, ax_conc]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_entry(
    label: str, outcomes: list[RequestOutcome] | None = None, doc: dict | None = None
) -> dict:
    if outcomes is not None:
        series = series_from_outcomes(outcomes)
        tl = (doc or {}).get("timeline") or timeline(outcomes)
    else:
        series = series_from_document(doc or {})
        tl = (doc or {}).get("timeline")
    return {"label": label, "series": series, "timeline": tl}
