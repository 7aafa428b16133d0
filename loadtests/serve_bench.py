"""`rayfleet bench serve`: drive a workload against one or more OpenAI-compatible servers.

Load shape: sessions (requests, or conversations for multi-turn) arrive as a Poisson
process at `--request-rate` (gamma-distributed gaps with `--burstiness` != 1), or all at
once with `inf`; at most `--max-concurrency` requests are in flight; the run stops issuing
after `--num-prompts` sessions or `--duration` seconds, whichever comes first, and waits
for those in flight. Warm-up requests (their own prompts) run before and are not counted.

The client watches itself: the process CPU time it spent per streamed token and how late
its event loop woke up are part of every result, so a saturated client shows in the data.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rayfleet.loadtests.client import StreamingClient, is_chat_endpoint
from rayfleet.loadtests.metrics import (
    RequestOutcome,
    calculate_metrics,
    compare_with_server,
    counter_deltas,
    parse_prometheus_counters,
    per_request_fields,
    plot_bucket,
    timeline,
)
from rayfleet.loadtests.workloads import Session, conversation_messages, render_chat

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class LoadShape:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_sessions: int | None = None  # None: unbounded (then `duration_s` bounds the run)
    duration_s: float | None = None
    think_time_s: float = 0.0  # pause between the turns of a conversation
    seed: int = 0

    def validate(self) -> None:
        if self.request_rate <= 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if self.burstiness <= 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_sessions is None and self.duration_s is None:
            raise ValueError("bound the run with --num-prompts or --duration")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if (
            self.num_sessions is None
            and math.isinf(self.request_rate)
            and self.max_concurrency is None
        ):
            raise ValueError(
                "--duration with --request-rate inf needs --max-concurrency or --num-prompts"
            )


def arrival_offsets(shape: LoadShape):
    """Seconds after the start at which each session arrives (an endless generator when
    the count is unbounded). Gaps ~ Gamma(k=burstiness, theta=1/(rate*burstiness)): mean
    1/rate, Poisson at burstiness 1. With a known count the gaps are rescaled so the last
    arrival lands at count/rate, as vLLM does, so runs with different seeds agree."""
    rng = np.random.default_rng(shape.seed)
    rate, k = shape.request_rate, shape.burstiness
    n = shape.num_sessions
    if math.isinf(rate):
        i = 0
        while n is None or i < n:
            yield 0.0
            i += 1
        return
    theta = 1.0 / (rate * k)
    if n is not None:
        offs = (
            np.cumsum(rng.gamma(k, theta, size=n))
            if not math.isinf(k)
            else np.arange(1, n + 1) / rate
        )
        if offs[-1] > 0:
            offs *= (n / rate) / offs[-1]
        yield from (float(x) for x in offs)
        return
    t = 0.0
    while True:
        t += rng.gamma(k, theta) if not math.isinf(k) else 1.0 / rate
        yield t


class LoopLagMonitor:
    """How late the event loop wakes a task that sleeps `interval_s` (client saturation)."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        perf = time.perf_counter
        while True:
            t = perf()
            await asyncio.sleep(self.interval_s)
            self.lags.append(perf() - t - self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        arr = np.asarray(self.lags or [0.0]) * 1000.0
        return {
            "loop_lag_p50_ms": float(np.percentile(arr, 50)),
            "loop_lag_p99_ms": float(np.percentile(arr, 99)),
            "loop_lag_max_ms": float(arr.max()),
        }


@dataclass
class RunOutput:
    outcomes: list[RequestOutcome]
    duration_s: float
    t0: float
    sessions_issued: int
    client: dict[str, float]


async def run_load(
    client: StreamingClient,
    sessions: list[Session],
    shape: LoadShape,
    tokenizer=None,
    pbar=None,
    request_id_prefix: str = "bench",
) -> RunOutput:
    """Issue sessions by the load shape and collect every request's outcome."""
    shape.validate()
    if not sessions:
        raise ValueError("the workload is empty")
    if not client.chat and tokenizer is None:
        if any(s.multi_turn or isinstance(t.prompt, list) for s in sessions for t in s.turns):
            raise ValueError(
                "chat messages to a completions endpoint need a tokenizer (chat template)"
            )
    sem = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    outcomes: list[RequestOutcome] = []
    perf = time.perf_counter
    t0 = perf()
    deadline = t0 + shape.duration_s if shape.duration_s else math.inf

    async def one_session(idx: int, session: Session, due: float, holding: bool) -> None:
        history: list[dict[str, str]] = []
        ready = due
        for k, turn in enumerate(session.turns):
            if k > 0:
                if shape.think_time_s:
                    await asyncio.sleep(shape.think_time_s)
                if perf() >= deadline:
                    break
                ready = perf()
                if sem is not None:
                    await sem.acquire()
                    holding = True
            if session.multi_turn:
                msgs = conversation_messages(history, turn)
                prompt: Any = msgs if client.chat else render_chat(tokenizer, msgs)
            else:
                prompt = turn.prompt
                if isinstance(prompt, list) and not client.chat:
                    prompt = render_chat(tokenizer, prompt)
            rid = f"{request_id_prefix}-{idx}-{k}"
            try:
                out = await client.request(prompt, turn.output_len, rid, turn.prompt_len)
            finally:
                if holding and sem is not None:
                    sem.release()
                holding = False
            out.queue_time = max(0.0, out.start_time - ready)
            outcomes.append(out)
            if pbar is not None:
                pbar.update(1)
            if not out.success:
                break  # a conversation cannot go on without its reply
            if session.multi_turn:
                history = [*msgs, {"role": "assistant", "content": out.generated_text}]

    tasks: list[asyncio.Task] = []
    issued = 0
    for i, offset in enumerate(arrival_offsets(shape)):
        due = t0 + offset
        wait = due - perf()
        if wait > 0:
            await asyncio.sleep(wait)
        if perf() >= deadline:
            break
        holding = False
        if sem is not None:
            await sem.acquire()  # wait here, not in a task: no unbounded backlog
            holding = True
            if perf() >= deadline:
                sem.release()
                break
        tasks.append(asyncio.create_task(one_session(i, sessions[i % len(sessions)], due, holding)))
        issued += 1
    if tasks:
        await asyncio.gather(*tasks)
    duration = perf() - t0
    return RunOutput(outcomes, duration, t0, issued, {})


async def fetch_counters(client: StreamingClient, url: str = "/metrics") -> dict[str, float] | None:
    try:
        status, text = await client.get_text(url)
    except Exception:
        return None
    if status != 200:
        return None
    return parse_prometheus_counters(text)


async def settled_deltas(
    client: StreamingClient,
    before: dict[str, float],
    expected_requests: int,
    wait_s: float,
    url: str = "/metrics",
) -> dict[str, float] | None:
    """Counter deltas once the server has counted every finished request (or `wait_s`):
    exporters such as Ray's publish counters seconds after the fact."""
    end = time.monotonic() + wait_s
    while True:
        after = await fetch_counters(client, url)
        if after is None:
            return None
        d = counter_deltas(before, after)
        if (
            d.get("request_success", expected_requests) >= expected_requests
            or time.monotonic() > end
        ):
            return d
        await asyncio.sleep(0.5)


async def benchmark_target(
    base_url: str,
    sessions: list[Session],
    warmup_sessions: list[Session],
    shape: LoadShape,
    *,
    endpoint: str = "/v1/completions",
    model: str | None = None,
    api_key: str | None = None,
    ignore_eos: bool = False,
    extra_body: dict | None = None,
    tokenizer=None,
    percentiles: list[float] = (90.0, 99.0),
    slo: dict[str, float] | None = None,
    disable_tqdm: bool = True,
    metrics_wait_s: float = 15.0,
    metrics_url: str | None = None,
    timeout_s: float = 600.0,
    label: str | None = None,
) -> tuple[dict, list[RequestOutcome]]:
    """One full run against one server: warm-up, measured run, figures, server check."""
    client = StreamingClient(
        base_url,
        endpoint,
        model,
        api_key,
        ignore_eos,
        extra_body,
        timeout_s,
        max_connections=shape.max_concurrency or 0,
    )
    async with client:
        if client.model is None:
            client.model = await client.first_model()
        if warmup_sessions:
            warm = LoadShape(math.inf, 1.0, shape.max_concurrency, len(warmup_sessions))
            w = await run_load(client, warmup_sessions, warm, tokenizer, None, "warmup")
            bad = [o for o in w.outcomes if not o.success]
            if bad:
                print(
                    f"warning: {len(bad)} of {len(w.outcomes)} warm-up requests failed: {bad[0].error}"
                )
        murl = metrics_url or "/metrics"
        before = None if murl == "none" else await fetch_counters(client, murl)
        pbar = None
        if not disable_tqdm:
            from tqdm import tqdm

            total = None
            if shape.num_sessions is not None:
                total = sum(
                    len(sessions[i % len(sessions)].turns) for i in range(shape.num_sessions)
                )
            pbar = tqdm(total=total, desc=label or base_url, unit="req", dynamic_ncols=True)
        gc.collect()
        gc.freeze()  # the workload is static: keep the collector off it during the run
        monitor = LoopLagMonitor()
        monitor.start()
        cpu0 = time.process_time()
        try:
            run = await run_load(
                client, sessions, shape, tokenizer, pbar, f"bench-{uuid.uuid4().hex[:8]}"
            )
        finally:
            cpu = time.process_time() - cpu0
            lag = await monitor.stop()
            gc.unfreeze()
            if pbar is not None:
                pbar.close()
        res = calculate_metrics(run.outcomes, run.duration_s, list(percentiles), slo)
        chunks = sum(o.chunks for o in run.outcomes)
        res["client_overhead"] = {
            "cpu_s": cpu,
            "cpu_utilization": cpu / run.duration_s,
            "cpu_ms_per_streamed_token": (cpu * 1000.0 / chunks) if chunks else None,
            **lag,
            "host_load_avg_1m": os.getloadavg()[0],
            "host_cpus": os.cpu_count(),
        }
        res["server_metrics"] = None
        res["server_check"] = None
        res["metrics_url"] = None if before is None else murl
        if before is not None:
            deltas = await settled_deltas(client, before, res["completed"], metrics_wait_s, murl)
            if deltas is not None:
                res["server_metrics"] = deltas
                res["server_check"] = compare_with_server(res, deltas)
        res["model_id"] = client.model
    res["num_prompts"] = run.sessions_issued
    res["timeline"] = timeline(run.outcomes, plot_bucket(run.duration_s), run.t0)
    res["_t0"] = run.t0
    return res, run.outcomes


def result_document(
    res: dict,
    outcomes: list[RequestOutcome],
    *,
    label: str,
    base_url: str,
    endpoint: str,
    tokenizer_id: str | None,
    shape: LoadShape,
    workload: dict[str, Any],
    slo: dict[str, float] | None,
    percentiles: list[float],
    save_detailed: bool,
    metadata: dict[str, str] | None = None,
) -> dict:
    """The result file: `vllm bench serve`'s keys first, then rayfleet's extras."""
    t0 = res.pop("_t0")
    chat = is_chat_endpoint(endpoint)
    doc: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if chat else "openai",
        "backend": "openai-chat" if chat else "openai",
        "label": label,
        "model_id": res.pop("model_id"),
        "tokenizer_id": tokenizer_id,
        "num_prompts": res.pop("num_prompts"),
        **(metadata or {}),
        "request_rate": shape.request_rate if not math.isinf(shape.request_rate) else "inf",
        "burstiness": shape.burstiness,
        "max_concurrency": shape.max_concurrency,
    }
    doc.update(res)
    doc["percentiles"] = list(percentiles)
    doc["goodput_slo"] = slo or None
    doc["base_url"] = base_url
    doc["endpoint"] = endpoint
    doc["duration_limit"] = shape.duration_s
    doc["workload"] = workload
    doc["tool"] = "rayfleet bench serve"
    # vLLM keeps the per-request lists only with --save-detailed; so do we.
    if save_detailed:
        doc.update(per_request_fields(outcomes, t0, texts=True))
    else:
        errs = [o.error for o in outcomes if o.error]
        doc["error_examples"] = errs[:10]
    return doc


def result_filename(doc: dict, result_dir: str | Path, filename: str | None) -> Path:
    if filename:
        path = Path(filename)
        return path if path.is_absolute() or path.parent != Path(".") else Path(result_dir) / path
    conc = f"-concurrency{doc['max_concurrency']}" if doc.get("max_concurrency") else ""
    model = str(doc.get("model_id") or "model").rstrip("/").split("/")[-1]
    return (
        Path(result_dir)
        / f"{doc['label']}-{doc['request_rate']}qps{conc}-{model}-{doc['date']}.json"
    )


def write_json(doc: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n", encoding="utf-8")
    return path
