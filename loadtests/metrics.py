"""The figures of a serving benchmark, from per-request timestamps.

Definitions (those of `vllm bench serve`, so results compare):
- TTFT: request sent -> first chunk that carries generated text.
- ITL: gap between consecutive text chunks of one request (all gaps of all requests).
- E2EL: request sent -> last chunk with choices.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), for requests with more than one token.
- Goodput: completed requests per second that meet every SLO given (TPOT counts as 0
  for one-token replies).
Output tokens come from the server's `usage`; a request without usage counts its text
chunks instead. Percentiles use linear interpolation (numpy's default).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SLO_NAMES = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestOutcome:
    """What the client saw of one request. Times are `time.perf_counter()` seconds."""

    success: bool = False
    request_id: str = ""
    start_time: float = 0.0  # when the request was sent
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    queue_time: float = 0.0  # waiting for a --max-concurrency slot before being sent
    prompt_len: int | None = None  # the workload's exact count, where known
    expected_output_len: int = 0
    prompt_tokens: int | None = None  # server usage
    output_tokens: int | None = None  # server usage
    chunks: int = 0  # streamed chunks that carried text
    finish_reason: str | None = None
    generated_text: str = ""
    error: str = ""
    error_reason: str = ""  # short category for the error table ("HTTP 429", "timeout", ...)
    replica: str | None = None  # rayfleet's x-rayfleet-replica response header, if any

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else self.chunks

    @property
    def num_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.prompt_len or 0

    @property
    def tpot(self) -> float:
        n = self.num_output_tokens
        return (self.latency - self.ttft) / (n - 1) if n > 1 else 0.0

    def token_times(self) -> list[float]:
        """Absolute arrival time of every text chunk."""
        times = [self.start_time + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            if not sep:
                raise ValueError(f"SLO must look like NAME:MS, got {part!r}")
            if name not in SLO_NAMES:
                raise ValueError(f"unknown SLO {name!r}; use one of {', '.join(SLO_NAMES)}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(
                    f"SLO {name} needs a number of milliseconds, got {value!r}"
                ) from None
            if ms < 0:
                raise ValueError(f"SLO {name} must be >= 0 ms, got {ms}")
            slo[name] = ms
    return slo


def is_good(o: RequestOutcome, slo: dict[str, float]) -> bool:
    values = {"ttft": o.ttft, "tpot": o.tpot, "e2el": o.latency}
    return o.success and all(values[k] * 1000.0 <= ms for k, ms in slo.items())


def summarize(values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean / median / std / pXX in milliseconds; zeros for an empty list (as vLLM)."""
    arr = np.asarray(values_s if values_s else [0.0], dtype=float) * 1000.0
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{percentile_word(p)}"] = float(np.percentile(arr, p))
    return out


def percentile_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def peak_concurrency(outcomes: list[RequestOutcome]) -> int:
    """Most requests in flight at once, over half-open [start, start+latency) intervals."""
    events = []
    for o in outcomes:
        events.append((o.start_time, 1))
        events.append((o.start_time + o.latency, -1))
    events.sort()  # at equal times -1 sorts first: an end frees its slot before a start
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def timeline(
    outcomes: list[RequestOutcome], bucket_s: float = 1.0, t0: float | None = None
) -> dict[str, list[float]]:
    """Output tokens per second and requests in flight, per bucket from the first send.

    A chunk's tokens are counted when it arrives (a request's usage count spread evenly
    over its chunks), so the buckets add up to the total output tokens.
    """
    ok = [o for o in outcomes if o.success]
    if not ok:
        return {"bucket_s": bucket_s, "t": [], "output_tokens_per_s": [], "concurrent_requests": []}
    if t0 is None:
        t0 = min(o.start_time for o in ok)
    end = max(o.start_time + o.latency for o in ok)
    n = int(np.floor((end - t0) / bucket_s)) + 1
    tokens = np.zeros(n)
    busy = np.zeros(n)  # request-seconds in flight per bucket
    for o in ok:
        times = np.asarray(o.token_times()) - t0
        weight = o.num_output_tokens / len(times)
        idx = np.clip((times / bucket_s).astype(int), 0, n - 1)
        np.add.at(tokens, idx, weight)
        a, b = o.start_time - t0, o.start_time + o.latency - t0
        for k in range(int(a // bucket_s), min(n, int(b // bucket_s) + 1)):
            lo, hi = max(a, k * bucket_s), min(b, (k + 1) * bucket_s)
            if hi > lo:
                busy[k] += hi - lo
    return {
        "bucket_s": bucket_s,
        "t": [float(k * bucket_s) for k in range(n)],
        "output_tokens_per_s": (tokens / bucket_s).tolist(),
        "concurrent_requests": (busy / bucket_s).tolist(),
    }


def plot_bucket(duration_s: float) -> float:
    """A bucket width that gives a readable time series: 1 s, or finer for short runs."""
    for b in (0.05, 0.1, 0.2, 0.5):
        if duration_s <= 30 * b:
            return b
    return 1.0


def calculate_metrics(
    outcomes: list[RequestOutcome],
    duration_s: float,
    percentiles: list[float] = (90.0, 99.0),
    slo: dict[str, float] | None = None,
) -> dict:
    """The run's figures, keyed as in `vllm bench serve`'s result file (plus a few extras)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [o for o in outcomes if o.success]
    failed = [o for o in outcomes if not o.success]
    total_in = sum(o.num_prompt_tokens for o in ok)
    total_out = sum(o.num_output_tokens for o in ok)
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [o.tpot for o in ok if o.num_output_tokens > 1],
        "itl": [g for o in ok for g in o.itl],
        "e2el": [o.latency for o in ok],
    }
    tl = timeline(ok)
    with_usage = sum(1 for o in ok if o.output_tokens is not None)
    res: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": (sum(is_good(o, slo) for o in ok) / duration_s) if slo else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": max(tl["output_tokens_per_s"], default=0.0),
        "max_concurrent_requests": peak_concurrency(ok),
    }
    for name in LATENCY_METRICS:
        for stat, value in summarize(series[name], list(percentiles)).items():
            res[f"{stat}_{name}_ms"] = value
    # Extras (not in vLLM's file; its readers ignore unknown keys).
    res["good_requests"] = sum(is_good(o, slo) for o in ok) if slo else None
    res["error_reasons"] = dict(Counter(o.error_reason or "unknown" for o in failed))
    res["token_count_source"] = (
        "usage" if with_usage == len(ok) else "chunks" if with_usage == 0 else "mixed"
    )
    res["total_streamed_chunks"] = sum(o.chunks for o in ok)
    res["token_count_mismatches"] = sum(
        1 for o in ok if o.output_tokens is not None and o.output_tokens != o.chunks
    )
    res["prompt_len_mismatches"] = sum(
        1
        for o in ok
        if o.prompt_tokens is not None
        and o.prompt_len is not None
        and o.prompt_tokens != o.prompt_len
    )
    res["output_len_mismatches"] = sum(
        1 for o in ok if o.expected_output_len and o.num_output_tokens != o.expected_output_len
    )
    return res


def per_request_fields(outcomes: list[RequestOutcome], t0: float, texts: bool = False) -> dict:
    """vLLM's detailed per-request lists (start times relative to the run's start)."""
    out = {
        "input_lens": [o.num_prompt_tokens for o in outcomes],
        "output_lens": [o.num_output_tokens if o.success else 0 for o in outcomes],
        "ttfts": [o.ttft for o in outcomes],
        "itls": [o.itl for o in outcomes],
        "latencies": [o.latency for o in outcomes],
        "start_times": [o.start_time - t0 for o in outcomes],
        "queue_times": [o.queue_time for o in outcomes],
        "errors": [o.error for o in outcomes],
    }
    if texts:
        out["generated_texts"] = [o.generated_text for o in outcomes]
    return out


# ---------------------------------------------------------------- server metrics

# Counters compared with the client's counts; names as vLLM's, under any of these prefixes.
_SERVER_COUNTERS = {
    "request_success_total": "request_success",
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "prefix_cache_queries_total": "prefix_cache_queries",
    "prefix_cache_hits_total": "prefix_cache_hits",
    "num_preemptions_total": "num_preemptions",
}
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_PREFIXES = ("rayfleet:", "vllm:", "ray_rayfleet_", "ray_vllm_", "rayfleet_", "vllm_")


def parse_prometheus_counters(text: str) -> dict[str, float]:
    """Sum the known counters over their labels, from Prometheus' text format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        name = m.group(1)
        for prefix in _PREFIXES:
            if name.startswith(prefix) and name[len(prefix) :] in _SERVER_COUNTERS:
                key = _SERVER_COUNTERS[name[len(prefix) :]]
                try:
                    out[key] = out.get(key, 0.0) + float(m.group(3))
                except ValueError:
                    pass
                break
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def compare_with_server(res: dict, deltas: dict[str, float]) -> dict:
    """Client counts against the server's counter deltas over the run."""
    checks = {}
    pairs = {
        "request_success": res["completed"],
        "prompt_tokens": res["total_input_tokens"],
        "generation_tokens": res["total_output_tokens"],
    }
    for key, client in pairs.items():
        if key in deltas:
            checks[key] = {"client": client, "server": deltas[key], "agree": client == deltas[key]}
    # A server may count only the prompt tokens it computed; cached ones are prefix hits.
    p = checks.get("prompt_tokens")
    if p and not p["agree"] and "prefix_cache_hits" in deltas:
        if p["server"] + deltas["prefix_cache_hits"] == p["client"]:
            p["agree"] = True
            p["note"] = "server counts computed tokens; + prefix cache hits = client"
    return checks
