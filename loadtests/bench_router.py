"""`rayfleet bench router`: the routing policies back to back on real replicas, in one run.

For each policy in turn (kv-aware, then power-of-two; round-robin when asked) the command
deploys the rayfleet app with N replicas of the default model on a local Ray cluster it
starts itself (loopback only: run it inside `unshare -n`, or as root and it enters a private
network namespace; HOME in a temporary folder; Ray's session folder short, under /tmp),
warms it up, drives each workload through the HTTP endpoint with the `bench serve` client at
a fixed request rate, and deletes the app. Every policy gets the same prompts in the same
order with the same arrival times (one seed).

Workloads (sizes from the command line):
- shared-prefix: G groups x P prompts, each a group prefix plus a suffix of its own;
- random: independent prompts of the same total length (nothing to share);
- skewed: a share (80%) of the requests start with one hot prefix, the rest share nothing.

Per policy and workload: the `bench serve` figures (TTFT, TPOT, ITL, E2E latency, throughput)
and the fleet's prefix-cache hit rate = sum over replicas of prefix-cache hits / queries (in
prompt tokens, as the engine counts them), from the deltas of each replica engine's counters
before and after the workload. They are read from the replica actors themselves (Ray's
`__ray_call__`, reaching the `LLMServer` inside Serve's replica actor: exact and immediate).
`--counters metrics` (and the fallback where that read fails) reads the same counters
(`rayfleet:prefix_cache_{hits,queries}`) from Ray's metrics agent instead, waiting until
they have caught up with every token the client saw; on a heavily loaded machine a lost
export loses increments for good, and the table then says the counters did not settle.

The oracle hit rate (`oracle_hit_rate`) is the most any placement could reach with the same
cache sizes, in the engine's units: a request can hit at most its leading full prompt blocks
but one token (the engine always computes the last prompt token), and only blocks that an
earlier request (in arrival order) computed somewhere in the fleet. When every block that
is ever reused fits in the fleet's cache (replicas x KV blocks per replica), that is the
oracle: prompt tokens in leading blocks seen before / prompt tokens. When it does not fit,
the oracle is the hit count of Belady's optimal replacement (evict the block needed again
furthest in the future, never cache a block not needed again) on one pooled cache of
replicas x KV blocks: the union of the replicas' caches is one such cache, so no placement
on the real fleet can do better. Both ignore timing (a block is reusable as soon as it was
computed) and the blocks running requests hold, so the oracle is an upper bound.

Targets (issue 5), checked per workload between kv-aware and power-of-two:
- shared-prefix: kv-aware's hit rate >= 90% of the oracle; its median TTFT >= 2x lower;
- random: kv-aware's output throughput and median TTFT no more than 5% worse;
- skewed: kv-aware's p99 TTFT no worse.

Output: a table per workload, `loadtests/results/router-<date>.json` and a PNG per workload
(latency CDFs and throughput over time, one line per policy).

Defaults: the issue's sizes for shared-prefix (16 x 8, 512 + 64 tokens, 32 out) on 3
replicas of 512 KV blocks each (the 16 prefixes are 512 blocks: they fit one replica only
with nothing else cached), random with 40 requests, skewed with 200 (its target is a
p99: of 100 requests that is the second-largest TTFT, and the ratio moved by 0.05-0.15
between runs). Each replica runs one torch thread. The rates are what a 2-core machine carries without unbounded queueing,
from the engine's measured CPU cost per request there (1 thread; float32): a cold 576-token
prefill 1.45 CPU-s, the 64-token suffix after a cached 512-token prefix 0.19 CPU-s, 32
decode steps at batch 2-4 1.2-1.7 CPU-s. So a random request costs ~2.9 CPU-s and a
shared-prefix one 1.6 (hit) to 2.9 (miss); with ~1.6 of the 2 cores left to the replicas
(ingress, client and Ray take the rest), power-of-two at ~50% hits carries ~0.75 req/s of
shared-prefix and ~0.55 req/s of random. Defaults: 0.6 req/s (shared-prefix, skewed), 0.45
(random): ~24 minutes in all. On a bigger machine raise the rates and sizes.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from heapq import heappop, heappush
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rayfleet.loadtests.arg_types import key_value_arg
from rayfleet.loadtests.workloads import Session

POLICIES = ("kv-aware", "power-of-two", "round-robin")
BASELINE = "power-of-two"
CANDIDATE = "kv-aware"
ROUTER_WORKLOADS = ("shared-prefix", "random", "skewed")
APP_NAME = "rayfleet"

# ---------------------------------------------------------------------------------------------
# The oracle


@dataclass
class Oracle:
    """The best hit rate any placement could reach (see the module docstring)."""

    prompt_tokens: int  # the engine's queries: every prompt token
    reusable_tokens: int  # tokens in leading blocks seen before (an unbounded cache)
    oracle_tokens: int  # with the fleet's cache size (Belady on the pooled cache)
    reused_blocks: int  # distinct blocks some later request hits: the working set
    capacity_blocks: int  # replicas x KV blocks per replica
    block_size: int

    @property
    def fits(self) -> bool:
        return self.reused_blocks <= self.capacity_blocks

    @property
    def hit_rate(self) -> float:
        return self.oracle_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def unbounded_hit_rate(self) -> float:
        return self.reusable_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "fits": self.fits,
            "hit_rate": self.hit_rate,
            "unbounded_hit_rate": self.unbounded_hit_rate,
        }


def block_keys(token_ids: Sequence[int], block_size: int, table: dict) -> list[int]:
    """Chained keys of every full block: equal keys <=> equal token prefixes (as the engine's
    chained block hashes, but exact: `table` numbers each (parent key, block tokens))."""
    keys: list[int] = []
    parent = -1
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        k = (parent, tuple(token_ids[start : start + block_size]))
        parent = table.setdefault(k, len(table))
        keys.append(parent)
    return keys


def oracle_hit_rate(
    prompts: Sequence[Sequence[int]],
    block_size: int,
    num_replicas: int,
    blocks_per_replica: int,
) -> Oracle:
    """The oracle hit rate of prompts (token ids, in arrival order) on a fleet of
    `num_replicas` caches of `blocks_per_replica` blocks each."""
    if block_size < 1 or num_replicas < 1 or blocks_per_replica < 1:
        raise ValueError(
            f"block size, replicas and blocks per replica must be >= 1, got "
            f"{block_size}, {num_replicas}, {blocks_per_replica}"
        )
    table: dict = {}
    reqs = [block_keys(p, block_size, table) for p in prompts]
    # The engine looks up at most (n - 1) // block_size leading blocks of an n-token prompt.
    hittable = [max(0, (len(p) - 1) // block_size) for p in prompts]
    total = sum(len(p) for p in prompts)

    # Unbounded: a leading block hits if any earlier request computed it.
    seen: set[int] = set()
    reused: set[int] = set()
    reusable = 0
    for keys, k in zip(reqs, hittable, strict=True):
        n = 0
        while n < k and keys[n] in seen:
            n += 1
        reused.update(keys[:n])
        reusable += n * block_size
        seen.update(keys)

    capacity = num_replicas * blocks_per_replica
    if len(reused) <= capacity:
        bounded = reusable
    else:
        bounded = _belady_hits(reqs, hittable, capacity) * block_size
    return Oracle(total, reusable, bounded, len(reused), capacity, block_size)


def _belady_hits(reqs: list[list[int]], hittable: list[int], capacity: int) -> int:
    """Leading-block hits of Belady's MIN (with bypass) on one cache of `capacity` blocks.

    Eviction order: the block needed again furthest in the future, the deepest first on a
    tie, so a parent outlives its children (a chained block is only ever needed together
    with its parent) and every hit the cache holds is a leading hit."""
    never = math.inf
    uses: dict[int, list[int]] = defaultdict(list)
    for j, (keys, k) in enumerate(zip(reqs, hittable, strict=True)):
        for key in keys[:k]:
            uses[key].append(j)
    pos: dict[int, int] = defaultdict(int)

    def next_use(key: int, j: int) -> float:
        u, i = uses.get(key, ()), pos[key]
        while i < len(u) and u[i] <= j:
            i += 1
        pos[key] = i
        return u[i] if i < len(u) else never

    cache: dict[int, tuple[float, int]] = {}  # key -> (next use, depth)
    heap: list[tuple[float, int, int]] = []  # (-next use, -depth, key), lazily invalidated
    hits = 0

    def victim() -> tuple[float, int, int] | None:
        while heap:
            nu, d, key = heap[0]
            if cache.get(key) == (-nu, -d):
                return heap[0]
            heappop(heap)
        return None

    for j, (keys, k) in enumerate(zip(reqs, hittable, strict=True)):
        n = 0
        while n < k and keys[n] in cache:
            n += 1
        hits += n
        for depth, key in enumerate(keys):  # every full prompt block is computed / refreshed
            nu = next_use(key, j)
            if key in cache:
                cache[key] = (nu, depth)
                heappush(heap, (-nu, -depth, key))
                continue
            if nu == never:
                continue
            if len(cache) >= capacity:
                v = victim()
                if v is None or (-v[0], -v[1]) <= (nu, depth):
                    continue  # everything cached is needed sooner: bypass
                heappop(heap)
                del cache[v[2]]
            cache[key] = (nu, depth)
            heappush(heap, (-nu, -depth, key))
    return hits


# ---------------------------------------------------------------------------------------------
# The fleet's counters (Ray's metrics agent, Prometheus text)

_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_FLEET_COUNTERS = {
    "prefix_cache_queries": "queries",
    "prefix_cache_hits": "hits",
    "num_preemptions": "preemptions",
    "prompt_tokens": "computed_prompt_tokens",
    "generation_tokens": "generation_tokens",
}
_SAMPLE_RE = re.compile(r"^(?:ray_)?rayfleet[_:](\w+?)(?:_total)?(\{[^}]*\})?\s+(\S+)")


def parse_replica_counters(text: str) -> dict[str, dict[str, float]]:
    """replica -> {queries, hits, preemptions, ...} from the metrics agent's text."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if not m or m.group(1) not in _FLEET_COUNTERS:
            continue
        labels = dict(_LABEL_RE.findall(m.group(2) or ""))
        replica = labels.get("replica", "?")
        key = _FLEET_COUNTERS[m.group(1)]
        try:
            out[replica][key] = out[replica].get(key, 0.0) + float(m.group(3))
        except ValueError:
            pass
    return dict(out)


def fleet_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The fleet's counters over a workload: per replica (those in `after`) and summed."""
    per: dict[str, dict[str, float]] = {}
    for rep, vals in after.items():
        b = before.get(rep, {})
        d = {k: v - b.get(k, 0.0) for k, v in vals.items()}
        if any(d.values()):
            per[rep] = d
    tot = {k: sum(d.get(k, 0.0) for d in per.values()) for k in _FLEET_COUNTERS.values()}
    q = tot["queries"]
    return {
        **tot,
        "hit_rate": tot["hits"] / q if q else None,
        "replica_query_share": sorted(
            (round(d.get("queries", 0.0) / q, 4) for d in per.values()), reverse=True
        )
        if q
        else [],
        "per_replica": per,
    }


def read_metrics_counters(url: str) -> dict[str, dict[str, float]]:
    """The replicas' counters from Ray's metrics agent (exported about every second)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_replica_counters(r.read().decode("utf-8", "replace"))


def _engine_counters(actor) -> dict[str, Any]:
    """Runs inside a Serve replica actor (Ray's `__ray_call__`): its engine's counters."""
    user = actor._replica_impl._user_callable_wrapper.user_callable
    s = user.engine.get_stats()
    return {
        "replica": user.replica,
        "queries": float(s.prefix_cache_queries),
        "hits": float(s.prefix_cache_hits),
        "preemptions": float(s.num_preemptions),
        "computed_prompt_tokens": float(s.prompt_tokens_total),
        "generation_tokens": float(s.generation_tokens_total),
    }


def read_replica_counters(
    app: str, deployment: str = "LLMServer", timeout_s: float = 30.0
) -> dict[str, dict[str, float]]:
    """Every running replica's engine counters, read from the replica actors themselves."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == "serve" and a["name"].startswith(prefix)
    ]
    if not names:
        raise RuntimeError(f"no replica actors named {prefix}*")
    refs = [
        ray.get_actor(n, namespace="serve").__ray_call__.remote(_engine_counters) for n in names
    ]
    out = {}
    for r in ray.get(refs, timeout=timeout_s):
        out[r.pop("replica")] = r
    return out


class CounterReader:
    """The fleet's counters: read from the replicas (exact, at once) or, where that fails or
    is asked for, from Ray's metrics agent (exported with a delay; a report lost on a busy
    machine loses its increments for good)."""

    def __init__(self, source: str, metrics_url: str, app: str = APP_NAME):
        self.source, self.metrics_url, self.app = source, metrics_url, app

    def read(self) -> dict[str, dict[str, float]]:
        if self.source == "replicas":
            try:
                return read_replica_counters(self.app)
            except Exception as e:
                print(f"warning: reading the replicas failed ({e!r}); using metrics from now on")
                self.source = "metrics"
        return read_metrics_counters(self.metrics_url)

    def read_or_empty(self) -> dict[str, dict[str, float]]:
        try:
            return self.read()
        except OSError:
            return {}

    def wait(
        self,
        before: dict[str, dict[str, float]],
        min_queries: float,
        timeout_s: float,
        min_generated: float = 0.0,
    ) -> tuple[dict[str, dict[str, float]], bool]:
        """Poll until the fleet's deltas reach `min_queries` prompt tokens looked up and
        `min_generated` tokens generated (everything the client saw), or `timeout_s`;
        return (counters, settled)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                after = self.read()
            except OSError:
                after = None
            if after is not None:
                d = fleet_delta(before, after)
                if d["queries"] >= min_queries and d["generation_tokens"] >= min_generated:
                    return after, True
                if time.monotonic() > deadline:
                    return after, False
            elif time.monotonic() > deadline:
                return before, False
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Comparison and targets


def request_records(outcomes: Sequence, sessions: Sequence[Session]) -> dict[str, list]:
    """Per request, in workload order: its kind (the skewed workload's hot prefix or not;
    the shared-prefix group), when it was sent (s after the first), TTFT and E2E latency
    (ms; None when it failed), and the replica that took it (rayfleet's response header).
    What a tail figure needs to be explained."""
    by_index: dict[int, Any] = {}
    for o in outcomes:
        try:  # the client's request ids end with -<session index>-<turn>
            by_index[int(o.request_id.rsplit("-", 2)[1])] = o
        except (ValueError, IndexError):
            continue
    t0 = min((o.start_time for o in outcomes), default=0.0)
    out: dict[str, list] = {
        "hot": [], "group": [], "start_s": [], "ttft_ms": [], "e2el_ms": [], "replica": [],
    }  # fmt: skip
    for i, s in enumerate(sessions):
        o = by_index.get(i)
        ok = o is not None and o.success
        out["hot"].append(s.meta.get("hot"))
        out["group"].append(s.group)
        out["start_s"].append(round(o.start_time - t0, 3) if o is not None else None)
        out["ttft_ms"].append(round(o.ttft * 1000, 1) if ok else None)
        out["e2el_ms"].append(round(o.latency * 1000, 1) if ok else None)
        out["replica"].append(o.replica if o is not None else None)
    return out


def ttft_by_kind(run: dict | None) -> dict[str, dict[str, float]] | None:
    """Median and p99 TTFT of the hot-prefix requests and of the others (skewed)."""
    rec = (run or {}).get("requests")
    if not rec or not any(h is not None for h in rec["hot"]):
        return None
    out = {}
    for kind, want in (("hot", True), ("other", False)):
        xs = [
            t
            for t, h in zip(rec["ttft_ms"], rec["hot"], strict=True)
            if h is want and t is not None
        ]
        if xs:
            out[kind] = {
                "n": len(xs),
                "median_ms": float(np.median(xs)),
                "p99_ms": float(np.percentile(xs, 99)),
            }
    return out


def _get(run: dict | None, key: str) -> float | None:
    if not run:
        return None
    if key == "hit_rate":
        return (run.get("fleet") or {}).get("hit_rate")
    v = (run.get("bench") or {}).get(key)
    return v if isinstance(v, int | float) else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# Per workload: (target, numerator policy, denominator policy, figure, bound, higher is ok).
_RATIO_TARGETS: dict[str, list[tuple[str, str, str, str, float, bool]]] = {
    "shared-prefix": [
        ("median TTFT power-of-two / kv-aware >= 2", "power-of-two", "kv-aware",
         "median_ttft_ms", 2.0, True),
    ],
    "random": [
        ("output throughput kv-aware / power-of-two >= 0.95", "kv-aware", "power-of-two",
         "output_throughput", 0.95, True),
        ("median TTFT kv-aware / power-of-two <= 1.05", "kv-aware", "power-of-two",
         "median_ttft_ms", 1.05, False),
    ],
    "skewed": [
        ("p99 TTFT kv-aware / power-of-two <= 1", "kv-aware", "power-of-two",
         "p99_ttft_ms", 1.0, False),
    ],
}  # fmt: skip


def check_targets(
    workload: str, kv: dict | None, p2c: dict | None, oracle: Oracle | None
) -> list[dict[str, Any]]:
    """The issue's targets for one workload: [{target, value, bound, ok}] (ok None: no data)."""

    def row(target: str, value: float | None, bound: float, higher_ok: bool) -> dict[str, Any]:
        ok = None if value is None else (value >= bound if higher_ok else value <= bound)
        return {"target": target, "value": value, "bound": bound, "ok": ok}

    runs = {"kv-aware": kv, "power-of-two": p2c}
    rows = []
    if workload == "shared-prefix":
        orc = oracle.hit_rate if oracle else None
        rows.append(row("hit rate / oracle >= 0.90", ratio(_get(kv, "hit_rate"), orc), 0.90, True))
    for target, num, den, key, bound, higher_ok in _RATIO_TARGETS.get(workload, []):
        value = ratio(_get(runs[num], key), _get(runs[den], key))
        rows.append(row(target, value, bound, higher_ok))
    failed = [p for p, r in (("kv-aware", kv), ("power-of-two", p2c)) if _get(r, "failed")]
    if failed:
        for r in rows:
            r["ok"] = False
            r["note"] = f"failed requests under {', '.join(failed)}"
    return rows


# (key, label, format, higher is better)
TABLE_ROWS = [
    ("completed", "requests completed", "d", True),
    ("failed", "requests failed", "d", False),
    ("request_throughput", "request throughput (req/s)", ".3f", True),
    ("output_throughput", "output throughput (tok/s)", ".2f", True),
    ("mean_ttft_ms", "TTFT mean (ms)", ".1f", False),
    ("median_ttft_ms", "TTFT median (ms)", ".1f", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", ".1f", False),
    ("median_tpot_ms", "TPOT median (ms)", ".1f", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", ".1f", False),
    ("median_e2el_ms", "E2E latency median (ms)", ".1f", False),
    ("p99_e2el_ms", "E2E latency p99 (ms)", ".1f", False),
    ("hit_rate", "prefix-cache hit rate", ".3f", True),
]


def pool_rounds(rounds: list[dict], outcomes: list) -> dict:
    """One policy's runs of one workload over several rounds, as one run: the `bench serve`
    figures over every round's requests (durations added), the fleet's counters summed,
    the per-request records concatenated (with their round), and each round kept as is."""
    from rayfleet.loadtests.metrics import calculate_metrics

    if len(rounds) == 1:
        return rounds[0]
    duration = sum(r["bench"]["duration"] for r in rounds)
    bench = calculate_metrics(outcomes, duration, [90.0, 99.0])
    bench["duration"] = duration
    fleets = [r.get("fleet") or {} for r in rounds]
    hits = sum(f.get("hits") or 0.0 for f in fleets)
    queries = sum(f.get("queries") or 0.0 for f in fleets)
    shares = [f.get("replica_query_share") or [] for f in fleets]
    width = max((len(x) for x in shares), default=0)
    fleet = {
        "hits": hits,
        "queries": queries,
        "hit_rate": hits / queries if queries else None,
        "replica_query_share": [
            round(sum(x[i] if i < len(x) else 0.0 for x in shares) / len(shares), 4)
            for i in range(width)
        ],
        "settled": all(f.get("settled", True) for f in fleets),
    }
    requests: dict[str, list] = {}
    for i, r in enumerate(rounds):
        rec = r.get("requests") or {}
        for k, v in rec.items():
            requests.setdefault(k, []).extend(v)
        requests.setdefault("round", []).extend([i] * len(rec.get("ttft_ms", [])))
    return {"bench": bench, "fleet": fleet, "requests": requests, "rounds": rounds}


def compare_workload(
    workload: str, runs: dict[str, dict], oracle: Oracle | None, baseline: str = BASELINE
) -> dict[str, Any]:
    """One workload's policies side by side: values, ratios to the baseline, targets."""
    policies = list(runs)
    rows = []
    for key, label, fmt, higher in TABLE_ROWS:
        vals = {p: _get(runs[p], key) for p in policies}
        if all(v is None for v in vals.values()):
            continue
        ratios = {p: ratio(vals[p], vals.get(baseline)) for p in policies if p != baseline}
        rows.append(
            {
                "key": key,
                "label": label,
                "fmt": fmt,
                "higher_is_better": higher,
                "values": vals,
                "ratios": ratios,
            }
        )
    out: dict[str, Any] = {"policies": policies, "baseline": baseline, "rows": rows}
    if oracle is not None:
        out["oracle_hit_rate"] = oracle.hit_rate
        out["hit_rate_vs_oracle"] = {
            p: ratio(_get(runs[p], "hit_rate"), oracle.hit_rate) for p in policies
        }
    out["replica_query_share"] = {
        p: (runs[p].get("fleet") or {}).get("replica_query_share") for p in policies
    }
    kinds = {p: ttft_by_kind(runs[p]) for p in policies}
    if any(kinds.values()):
        out["ttft_by_kind"] = kinds
    unsettled = [p for p in policies if (runs[p].get("fleet") or {}).get("settled") is False]
    if unsettled:
        out["unsettled"] = unsettled
    out["targets"] = check_targets(workload, runs.get(CANDIDATE), runs.get(baseline), oracle)
    cand, base = (runs.get(CANDIDATE) or {}).get("rounds"), (runs.get(baseline) or {}).get("rounds")
    if cand and base:  # each round's own verdicts, next to the pooled ones
        out["round_targets"] = [
            check_targets(workload, c, b, oracle) for c, b in zip(cand, base, strict=False)
        ]
    return out


def _fmt(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if fmt == "d":
        return str(int(v))
    return format(v, fmt)


def format_comparison(workload: str, comp: dict[str, Any], title: str = "") -> str:
    policies, base = comp["policies"], comp["baseline"]
    others = [p for p in policies if p != base]
    head = f"{'metric':<30}" + "".join(f"{p[:14]:>15}" for p in policies)
    head += "".join(f"{(p[:8] + '/' + base[:5]):>16}" for p in others if base in policies)
    width = len(head)
    out = [f" {workload}{': ' + title if title else ''} ".center(width, "="), head, "-" * width]
    for r in comp["rows"]:
        line = f"{r['label']:<30}" + "".join(
            f"{_fmt(r['values'][p], r['fmt']):>15}" for p in policies
        )
        if base in policies:
            for p in others:
                x = r["ratios"].get(p)
                line += f"{'-' if x is None else f'{x:.3f}x':>16}"
        out.append(line)
    if "oracle_hit_rate" in comp:
        line = f"{'oracle hit rate':<30}" + f"{comp['oracle_hit_rate']:>15.3f}"
        out.append(line)
        vs = comp["hit_rate_vs_oracle"]
        out.append(
            f"{'hit rate / oracle':<30}"
            + "".join(f"{_fmt(vs.get(p), '.3f'):>15}" for p in policies)
        )
    shares = comp.get("replica_query_share") or {}
    if any(shares.values()):
        out.append(
            f"{'prompt tokens per replica':<30}"
            + "".join(
                f"{'/'.join(f'{x:.2f}' for x in shares.get(p) or []) or '-':>15}" for p in policies
            )
        )
    for kind in ("hot", "other"):
        by = {p: ((comp.get("ttft_by_kind") or {}).get(p) or {}).get(kind) for p in policies}
        if any(by.values()):
            cells = [f"{b['median_ms']:.0f}/{b['p99_ms']:.0f}" if b else "-" for b in by.values()]
            out.append(f"{f'TTFT p50/p99, {kind} (ms)':<30}" + "".join(f"{c:>15}" for c in cells))
    if comp.get("unsettled"):
        out.append(
            f"note: the replicas' counters had not caught up for {', '.join(comp['unsettled'])}"
        )
    out.append("-" * width)
    for i, targets in enumerate(comp.get("round_targets") or []):
        vals = ", ".join("-" if t["value"] is None else f"{t['value']:.3f}" for t in targets)
        out.append(f"round {i + 1} alone: {vals}")
    for t in comp["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["ok"]]
        val = "-" if t["value"] is None else f"{t['value']:.3f}"
        note = f"  ({t['note']})" if t.get("note") else ""
        out.append(f"[{mark}] {t['target']}: {val}{note}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass
class RouterWorkload:
    name: str
    sessions: list[Session]
    rate: float
    params: dict[str, Any]


def build_router_workloads(args, tokenizer, src=None) -> list[RouterWorkload]:
    """The workloads named by `args.workloads`, each from its own seed."""
    from rayfleet.loadtests.workloads import (
        TokenSource,
        random_workload,
        shared_prefix_workload,
        skewed_workload,
    )

    total_len = args.prefix_len + args.suffix_len
    out = []
    src = src or TokenSource(tokenizer)  # reading the vocabulary takes a while: reseed one
    for i, name in enumerate(args.workloads):
        src.rng = random.Random(args.seed + 1000 * i)
        if name == "shared-prefix":
            s = shared_prefix_workload(
                src,
                args.num_groups,
                args.prompts_per_group,
                args.prefix_len,
                args.suffix_len,
                args.output_len,
            )
            p = {
                "num_groups": args.num_groups,
                "prompts_per_group": args.prompts_per_group,
                "prefix_len": args.prefix_len,
                "suffix_len": args.suffix_len,
            }
            rate = args.request_rate
        elif name == "random":
            in_len = args.random_input_len or total_len
            s = random_workload(src, args.random_prompts, in_len, args.output_len)
            p = {"num_prompts": args.random_prompts, "input_len": in_len}
            rate = args.random_rate or args.request_rate
        elif name == "skewed":
            s = skewed_workload(
                src,
                args.skewed_prompts,
                args.prefix_len,
                args.suffix_len,
                args.output_len,
                args.hot_fraction,
            )
            p = {
                "num_prompts": args.skewed_prompts,
                "hot_fraction": args.hot_fraction,
                "prefix_len": args.prefix_len,
                "suffix_len": args.suffix_len,
            }
            rate = args.skewed_rate or args.request_rate
        else:
            raise ValueError(f"unknown workload {name!r}; choose from {ROUTER_WORKLOADS}")
        p.update(
            output_len=args.output_len,
            requests=len(s),
            request_rate=rate,
            seed=args.seed + 1000 * i,
        )
        out.append(RouterWorkload(name, s, rate, p))
    return out


def prompt_token_ids(tokenizer, sessions: list[Session]) -> list[list[int]]:
    """Each request's prompt as the ingress tokenizes a /v1/completions string."""
    return [list(tokenizer.encode(t.prompt)) for s in sessions for t in s.turns]


def workload_title(w: RouterWorkload) -> str:
    p = w.params
    if w.name == "shared-prefix":
        size = f"{p['num_groups']} groups x {p['prompts_per_group']} prompts, prefix {p['prefix_len']}, suffix {p['suffix_len']}"
    elif w.name == "skewed":
        size = f"{p['num_prompts']} prompts, {p['hot_fraction']:.0%} hot, prefix {p['prefix_len']}, suffix {p['suffix_len']}"
    else:
        size = f"{p['num_prompts']} prompts of {p['input_len']} tokens"
    return f"{size}, {p['output_len']} out, {w.rate:g} req/s"


def estimated_seconds(workloads: list[RouterWorkload], num_policies: int) -> float:
    """Sending time plus a rough allowance for deployment, warm-up and draining."""
    per_policy = sum(len(w.sessions) / w.rate + 10.0 for w in workloads) + 50.0
    return num_policies * per_policy + 30.0


# ---------------------------------------------------------------------------------------------
# The cluster


def app_args(args, policy: str, model_path: str) -> dict[str, Any]:
    max_len = max(args.prefix_len + args.suffix_len, args.random_input_len or 0)
    max_len = max(1024, max_len + args.output_len + args.block_size)
    out = {
        "model": {"path": model_path},
        "engine": {
            "device": "cpu",
            "dtype": "float32",
            "block_size": args.block_size,
            "num_kv_blocks": args.kv_blocks,
            "max_model_len": max_len,
            "max_num_seqs": args.max_num_seqs,
            "num_threads": args.replica_threads,
        },
        "replica": {
            "num_replicas": args.replicas,
            "max_ongoing_requests": args.max_num_seqs,
            "resources": {"num_cpus": args.replica_cpus},
        },
        "router": {"policy": policy, "seed": args.seed},
        "server": {"log_requests": False},
    }
    if args.set:
        from rayfleet.cluster.config import merge

        out = merge(out, {k: yaml.safe_load(v) for k, v in args.set})
        out["router"]["policy"] = policy  # the one field --set may not change
    return out


class LocalFleet:
    """A local Ray cluster with Serve on loopback; deploys one policy's app at a time."""

    def __init__(self, args):
        self.args = args
        self.temp = tempfile.mkdtemp(prefix="rfbr-", dir="/tmp")  # AF_UNIX path limit
        self.port = 0
        self.metrics_url = ""

    def start(self) -> None:
        import ray
        from ray import serve
        from rayfleet.cluster.testing import free_port

        a = self.args
        os.environ.setdefault("RAY_worker_niceness", "0")
        threads = str(a.replica_threads)
        mport = free_port()
        ray.init(
            num_cpus=max(math.ceil(a.replicas * a.replica_cpus) + 1, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 << 20,
            _temp_dir=self.temp,
            _metrics_export_port=mport,
            _system_config={"metrics_report_interval_ms": 1000},
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}},
        )
        self.metrics_url = f"http://127.0.0.1:{mport}/metrics"
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def deploy(self, policy: str, model_path: str) -> float:
        from ray import serve
        from rayfleet.cluster.app import build_app

        t = time.monotonic()
        serve.run(
            build_app(app_args(self.args, policy, model_path)), name=APP_NAME, route_prefix="/"
        )
        return time.monotonic() - t

    def undeploy(self) -> None:
        from ray import serve

        serve.delete(APP_NAME)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)


def _replica_threads_seen() -> str | None:
    """OMP_NUM_THREADS as a Ray worker sees it (the replicas' torch threads)."""
    import ray

    @ray.remote(num_cpus=0)
    def env() -> str | None:
        return os.environ.get("OMP_NUM_THREADS")

    return ray.get(env.remote(), timeout=60)


async def _warm_up(base_url: str, model: str, sessions: list[Session]) -> tuple[int, int]:
    """Send the warm-up requests all at once; return their (prompt, generated) tokens."""
    from rayfleet.loadtests.client import StreamingClient
    from rayfleet.loadtests.serve_bench import LoadShape, run_load

    async with StreamingClient(base_url, "/v1/completions", model, ignore_eos=True) as c:
        run = await run_load(c, sessions, LoadShape(math.inf, 1.0, None, len(sessions)))
    bad = [o for o in run.outcomes if not o.success]
    if bad:
        raise RuntimeError(f"{len(bad)} warm-up requests failed: {bad[0].error}")
    return (
        sum(o.prompt_tokens or o.prompt_len or 0 for o in run.outcomes),
        sum(o.output_tokens or 0 for o in run.outcomes),
    )


def run_policy(
    fleet: LocalFleet,
    policy: str,
    workloads: list[RouterWorkload],
    warmups: list[Session],
    model_path: str,
    model_name: str,
    tokenizer,
    args,
) -> tuple[dict[str, dict], dict[str, list], float]:
    """Deploy `policy`, run every workload, delete the app: ({workload: run}, outcomes, deploy s)."""
    from rayfleet.loadtests.serve_bench import LoadShape, benchmark_target, result_document

    print(f"[{policy}] deploying {args.replicas} replicas ...", flush=True)
    deploy_s = fleet.deploy(policy, model_path)
    runs: dict[str, dict] = {}
    outcomes: dict[str, list] = {}
    reader = CounterReader(args.counters, fleet.metrics_url)
    try:
        base = reader.read_or_empty()
        warm_in, warm_out = asyncio.run(_warm_up(fleet.base_url, model_name, warmups))
        counters, _ = reader.wait(base, warm_in, args.metrics_wait, warm_out)
        print(f"[{policy}] deployed in {deploy_s:.1f} s; warmed up", flush=True)
        for w in workloads:
            shape = LoadShape(w.rate, 1.0, None, len(w.sessions), None, 0.0, args.seed)
            print(
                f"[{policy}] {w.name}: {len(w.sessions)} requests at {w.rate:g} req/s ...",
                flush=True,
            )
            res, outs = asyncio.run(
                benchmark_target(
                    fleet.base_url,
                    w.sessions,
                    [],
                    shape,
                    model=model_name,
                    ignore_eos=True,
                    tokenizer=tokenizer,
                    disable_tqdm=args.disable_tqdm,
                    metrics_wait_s=args.metrics_wait,
                    metrics_url=fleet.metrics_url,
                    timeout_s=args.request_timeout,
                    label=f"{policy}/{w.name}",
                )
            )
            ok = [o for o in outs if o.success]
            sent = sum(o.prompt_tokens or o.prompt_len or 0 for o in ok)
            generated = sum(o.output_tokens or 0 for o in ok)
            after, settled = reader.wait(counters, sent, args.metrics_wait, generated)
            fleet_d = fleet_delta(counters, after)
            fleet_d["settled"] = settled
            fleet_d["source"] = reader.source
            fleet_d["client_prompt_tokens"] = sent
            fleet_d["client_generated_tokens"] = generated
            counters = after
            doc = result_document(
                res,
                outs,
                label=f"{policy}-{w.name}",
                base_url=fleet.base_url,
                endpoint="/v1/completions",
                tokenizer_id=model_path,
                shape=shape,
                workload={"name": w.name, **w.params},
                slo=None,
                percentiles=[90.0, 99.0],
                save_detailed=False,
            )
            runs[w.name] = {
                "bench": doc,
                "fleet": fleet_d,
                "requests": request_records(outs, w.sessions),
            }
            outcomes[w.name] = outs
            hr = fleet_d["hit_rate"]
            print(
                f"[{policy}] {w.name}: {doc['completed']} ok, {doc['failed']} failed, "
                f"median TTFT {doc.get('median_ttft_ms') or 0:.0f} ms, "
                f"hit rate {'-' if hr is None else f'{hr:.3f}'}"
                f"{'' if settled else ' (counters not settled)'}",
                flush=True,
            )
    finally:
        fleet.undeploy()
    return runs, outcomes, deploy_s


def run(args) -> int:
    from rayfleet.cluster.testing import isolated_ray_env, loopback_only
    from rayfleet.engine import default_model_path
    from rayfleet.loadtests.serve_bench import RESULTS_DIR, write_json
    from rayfleet.loadtests.workloads import TokenSource, load_tokenizer, random_workload

    validate_args(args)
    model_path = str(default_model_path())
    model_name = Path(model_path).name
    tokenizer = load_tokenizer(model_path)
    src = TokenSource(tokenizer)
    workloads = build_router_workloads(args, tokenizer, src)
    oracles = {
        w.name: oracle_hit_rate(
            prompt_token_ids(tokenizer, w.sessions), args.block_size, args.replicas, args.kv_blocks
        )
        for w in workloads
    }
    # Warm-up: prompts as long as the workloads', none shared with them, not measured.
    src.rng = random.Random(args.seed + 7919)
    warmups = random_workload(src, 2 * args.replicas, args.prefix_len + args.suffix_len, 4)
    policies = list(dict.fromkeys(args.policies))
    est = estimated_seconds(workloads, len(policies)) * args.rounds
    print(
        f"rayfleet bench router: {', '.join(policies)} x {', '.join(w.name for w in workloads)}; "
        f"{args.replicas} replicas, {args.kv_blocks} KV blocks each; about {est / 60:.0f} min"
    )
    for w in workloads:
        o = oracles[w.name]
        print(
            f"  {w.name}: {workload_title(w)}; oracle hit rate {o.hit_rate:.3f}"
            f"{'' if o.fits else ' (working set does not fit: Belady bound)'}"
        )

    t_start = time.monotonic()
    load_start = os.getloadavg()
    outcomes: dict[str, dict[str, list]] = {}
    deploy_s: dict[str, float] = {}
    by_round: dict[str, dict[str, list[dict]]] = {}
    threads_seen = None
    with tempfile.TemporaryDirectory(prefix="rfbr-home-") as home:
        net = None
        if not args.no_netns:
            net = loopback_only()
            try:
                net.__enter__()
            except OSError as e:
                raise ValueError(
                    f"cannot confine Ray to loopback ({e}); run inside `unshare -n` "
                    "(with `ip link set lo up`) or pass --no-netns"
                ) from None
        try:
            with isolated_ray_env(home):
                fleet = LocalFleet(args)
                try:
                    fleet.start()
                    threads_seen = _replica_threads_seen()
                    # Round k runs the policies in order, round k+1 in reverse: an
                    # effect of running first or second (a warmer box, a cooler one)
                    # falls on each policy equally.
                    for k in range(args.rounds):
                        order = policies if k % 2 == 0 else policies[::-1]
                        for policy in order:
                            r, o, d = run_policy(
                                fleet, policy, workloads, warmups, model_path, model_name,
                                tokenizer, args,
                            )  # fmt: skip
                            for name, run_ in r.items():
                                by_round.setdefault(policy, {}).setdefault(name, []).append(run_)
                                outcomes.setdefault(policy, {}).setdefault(name, []).extend(o[name])
                            deploy_s[policy] = deploy_s.get(policy, 0.0) + d
                finally:
                    fleet.stop()
        finally:
            if net is not None:
                net.__exit__(None, None, None)

    runs = {
        p: {name: pool_rounds(rs, outcomes[p][name]) for name, rs in by_round[p].items()}
        for p in policies
    }
    comparison = {}
    print()
    for w in workloads:
        per = {p: runs[p][w.name] for p in policies}
        comparison[w.name] = compare_workload(w.name, per, oracles[w.name])
        print(format_comparison(w.name, comparison[w.name], workload_title(w)))
        print()

    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "tool": "rayfleet bench router",
        "date": date,
        "model_id": model_name,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "replica_omp_threads": threads_seen,
        },
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "app_args": {p: app_args(args, p, model_path) for p in policies},
        "duration_s": time.monotonic() - t_start,
        "deploy_s": deploy_s,
        "workloads": {
            w.name: {"params": w.params, "oracle": oracles[w.name].to_dict()} for w in workloads
        },
        "comparison": comparison,
        "runs": runs,
    }
    if not args.no_save:
        result_dir = Path(args.result_dir) if args.result_dir else RESULTS_DIR
        path = write_json(doc, result_dir / f"router-{date}.json")
        print(f"result: {path}")
        if not args.no_plot:
            from rayfleet.loadtests.plot import plot_runs, run_entry

            for w in workloads:
                entries = [
                    run_entry(p, outcomes[p][w.name], runs[p][w.name]["bench"]) for p in policies
                ]
                png = plot_runs(
                    entries, path.with_name(f"router-{date}-{w.name}.png"), workload_title(w)
                )
                print(f"figure: {png}")
    failed = any(runs[p][w.name]["bench"]["failed"] for p in policies for w in workloads)
    return 1 if failed else 0


def validate_args(args) -> None:
    for name in (
        "replicas",
        "kv_blocks",
        "block_size",
        "max_num_seqs",
        "replica_threads",
        "rounds",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("request_rate", "random_rate", "skewed_rate"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if not 0.0 <= args.hot_fraction <= 1.0:
        raise ValueError(f"--hot-fraction must be in [0, 1], got {args.hot_fraction}")
    if args.replica_cpus <= 0:
        raise ValueError(f"--replica-cpus must be > 0, got {args.replica_cpus}")


def add_args(p) -> None:
    f = p.add_argument_group("fleet")
    f.add_argument("--replicas", type=int, default=3, help="LLMServer replicas")
    f.add_argument(
        "--policies",
        nargs="+",
        choices=POLICIES,
        default=["kv-aware", "power-of-two"],
        help="run in this order (add round-robin for a third column)",
    )
    f.add_argument("--kv-blocks", type=int, default=512, help="KV cache blocks per replica")
    f.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    f.add_argument("--max-num-seqs", type=int, default=32, help="running requests per replica")
    f.add_argument("--replica-threads", type=int, default=1, help="torch threads per replica (OMP)")
    f.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves")
    f.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every policy this many times, alternating their order (round 2 runs them "
        "in reverse), and judge the targets on the pooled requests; each round's own "
        "verdicts are printed too",
    )
    f.add_argument(
        "--set",
        action="append",
        default=[],
        type=key_value_arg,
        metavar="KEY=VALUE",
        help="a config field for every policy's app (a YAML value), e.g. "
        "router.stats_poll_interval_s=1.0; repeatable",
    )
    f.add_argument(
        "--no-netns",
        action="store_true",
        help="do not confine Ray to loopback (default: run in a loopback-only namespace)",
    )

    w = p.add_argument_group("workloads")
    w.add_argument(
        "--workloads", nargs="+", choices=ROUTER_WORKLOADS, default=list(ROUTER_WORKLOADS)
    )
    w.add_argument("--num-groups", type=int, default=16, help="shared-prefix: G")
    w.add_argument("--prompts-per-group", type=int, default=8, help="shared-prefix: P")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix and skewed")
    w.add_argument("--suffix-len", type=int, default=64, help="shared-prefix and skewed")
    w.add_argument("--output-len", type=int, default=32, help="every workload")
    w.add_argument("--random-prompts", type=int, default=40, help="random: requests")
    w.add_argument(
        "--random-input-len", type=int, default=None, help="random: default prefix + suffix"
    )
    w.add_argument(
        "--skewed-prompts",
        type=int,
        default=200,
        help="skewed: requests (its target is on p99 TTFT: at 100 that is the second "
        "largest value, which moved the ratio by 0.05-0.15 between runs here)",
    )
    w.add_argument("--hot-fraction", type=float, default=0.8, help="skewed: share that is hot")
    w.add_argument(
        "--request-rate",
        type=float,
        default=0.6,
        help="requests/s (Poisson), the same for every policy; shared-prefix, and the others "
        "unless set below",
    )
    w.add_argument("--random-rate", type=float, default=0.45, help="random: requests/s")
    w.add_argument("--skewed-rate", type=float, default=None, help="skewed: requests/s")
    w.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("output")
    r.add_argument("--result-dir", default=None, help="default: loadtests/results")
    r.add_argument("--no-save", action="store_true", help="print only; write no JSON or PNG")
    r.add_argument("--no-plot", action="store_true", help="write no PNG")
    r.add_argument("--disable-tqdm", action="store_true")
    r.add_argument("--request-timeout", type=float, default=600.0)
    r.add_argument(
        "--counters",
        choices=["replicas", "metrics"],
        default="replicas",
        help="where the prefix-cache counters come from: the replica actors (exact) or "
        "Ray's metrics agent (delayed, lossy under heavy load)",
    )
    r.add_argument(
        "--metrics-wait",
        type=float,
        default=30.0,
        help="seconds to wait for the replicas' counters to catch up",
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rayfleet bench router", description=__doc__)
    add_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Oracle",
    "block_keys",
    "check_targets",
    "compare_workload",
    "fleet_delta",
    "format_comparison",
    "oracle_hit_rate",
    "parse_replica_counters",
]
