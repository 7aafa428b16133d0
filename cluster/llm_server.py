"""LLMServer: the replica deployment. Each replica owns one `AsyncLLMEngine`.

The ingress calls `generate(GenerateRequest)` through a streaming `DeploymentHandle`; the
replica streams `StreamDelta`s back: over the ingress's token channel when the request names
one (`token_channel.py`: a socket of their own, about half the ingress's CPU per token of a
Serve stream item), else, or when the channel cannot be reached, as the handle stream's
items. Whatever the engine produced while the previous item
was on its way is merged into the next one, so a busy replica sends fewer, larger items
(adaptive coalescing: at low load every engine step is its own item, adding no latency).

Cancelling the stream (client disconnect: the ingress cancels the handle response) cancels
the engine consumer, which aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from rayfleet.engine import AsyncLLMEngine, Logprob, SamplingParams

from .config import parse_config
from .kv_router import RoutingStatsReporter
from .metrics import ReplicaMetrics
from .token_channel import ChannelAddress, ChannelSender, ChannelUnreachable

# The GIL switch interval in a replica's process. The engine thread takes the GIL back
# after every PyTorch op (hundreds a step) while the event loops stream deltas to Serve;
# with CPython's 5 ms default the two threads hand the GIL back and forth under force and
# the engine crawls. Measured (64 streams of 128/128 on 2 cores, each delta handled with
# ~0.1 ms of Python): 45 s at 5 ms, 52 s at 1 ms, 36 s at 50 ms, 35 s with no event loop
# at all (LLM.generate). Threads still switch at every op, where the engine releases it.
GIL_SWITCH_INTERVAL_S = 0.05

logger = logging.getLogger("ray.serve")

STATS_INTERVAL_S = 1.0


@dataclass
class GenerateRequest:
    """What the ingress sends a replica: token ids (or text) and sampling parameters."""

    request_id: str
    prompt: list[int] | str
    params: SamplingParams
    priority: int = 0
    endpoint: str = ""  # for the log line: "chat" | "completions"
    prompt_text: str | None = None  # only when prompts are to be logged
    # For the request router (`kv_router.RouteHint`: block hashes, length, priority);
    # the replica ignores it.
    route: Any = None
    # Where to send the deltas instead of yielding them (`token_channel.ChannelAddress`).
    channel: ChannelAddress | None = None


@dataclass(slots=True)
class SampleDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class StreamDelta:
    samples: list[SampleDelta] = field(default_factory=list)
    finished: bool = False
    num_prompt_tokens: int | None = None  # set on the first item
    num_cached_tokens: int = 0
    replica: str | None = None  # set on the first item
    error: str | None = None  # invalid input (HTTP 400); the only item of its stream
    # SamplingParams.prompt_logprobs: once, on the item that completes them (sample 0's
    # first token): one {token: Logprob} per prompt token, None for the first.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class LLMServer:
    """One model replica (wrapped with `serve.deployment` by `app.build_app`)."""

    async def __init__(self, config: dict[str, Any]):
        self.config = parse_config(config)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            ctx = serve.get_replica_context()
            self.replica = ctx.replica_id.unique_id
        except Exception:  # constructed outside Serve (tests, benchmarks)
            self.replica = "local"
        self.engine = AsyncLLMEngine.from_config(self.config.engine_config())
        self.model_name = self.engine.model_name
        self.metrics = ReplicaMetrics(self.model_name, self.replica)
        self._log_requests = self.config.server.log_requests
        r = self.config.router
        self._routing = RoutingStatsReporter(
            self.engine, self.config.engine.max_num_seqs, kv=r.policy == "kv-aware" and r.kv_events
        )
        self._routing_lock = asyncio.Lock()
        self._channel = ChannelSender()
        self._stats_task = asyncio.get_running_loop().create_task(self._stats_loop())

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, req: GenerateRequest):
        """Stream a request's deltas (the first carries the prompt length): as this call's
        items, or, when the request names a token channel, over that channel, yielding
        nothing here (unless the channel cannot be reached: then as items after all). Either
        way the call lasts until the request ends, and cancelling it aborts the request."""
        channel = req.channel
        sent = False
        # aclosing: a cancelled call must close the delta generator now (which aborts the
        # request in the engine), not whenever the garbage collector finalizes it.
        async with contextlib.aclosing(self._deltas(req)) as deltas:
            async for d in deltas:
                if channel is not None:
                    try:
                        await self._channel.send(channel, d)
                        sent = True
                        continue
                    except ChannelUnreachable:
                        if sent:  # its frames went on a connection that broke: never mix
                            raise
                        channel = None  # as the call's items: the ingress reads those too
                yield d

    async def _deltas(self, req: GenerateRequest):
        """The request's deltas from the engine.

        The engine merges whatever piled up while the previous item was on its way into
        the next one, so a busy replica sends fewer, larger items through Ray.
        """
        arrival = time.monotonic()
        agen = self.engine.generate(req.prompt, req.params, req.request_id, req.priority)
        finished = False
        num_prompt = 0
        num_out = 0
        finish_reasons: dict[int, str] = {}
        first_token_at: float | None = None
        last_token_at: float | None = None
        itls: list[float] = []
        engine_metrics = None
        try:
            try:
                out = await agen.__anext__()
            except ValueError as e:  # invalid input: the engine queued nothing
                finished = True
                finish_reasons = {0: "error"}
                yield StreamDelta(error=str(e), finished=True)
                return
            first = True
            while True:
                now = time.monotonic()
                d = self._delta(out, first)
                if first:
                    num_prompt = len(out.prompt_token_ids)
                    first = False
                for s in d.samples:
                    num_out += len(s.token_ids)
                    if s.finish_reason is not None:
                        finish_reasons[s.index] = s.finish_reason
                    if s.index == 0 and s.token_ids:
                        k = len(s.token_ids)
                        if first_token_at is None:
                            first_token_at = now
                            k -= 1
                        if last_token_at is not None and k > 0:
                            itls.extend([(now - last_token_at) / k] * k)
                        last_token_at = now
                if out.finished:
                    finished = True
                    engine_metrics = out.metrics
                yield d
                if finished:
                    return
                out = await agen.__anext__()
        finally:
            await agen.aclose()  # not finished: the engine aborts it and frees its blocks
            if not finished:
                finish_reasons = {0: "abort"}
            if finish_reasons.get(0) != "error":
                self._record(
                    req, arrival, num_prompt, num_out, finish_reasons, first_token_at, itls,
                    engine_metrics,
                )  # fmt: skip

    def _delta(self, out: Any, first: bool) -> StreamDelta:
        return StreamDelta(
            samples=[
                SampleDelta(
                    c.index, c.text, list(c.token_ids), c.logprobs, c.finish_reason, c.stop_reason
                )
                for c in out.outputs
            ],
            finished=out.finished,
            num_prompt_tokens=len(out.prompt_token_ids) if first else None,
            num_cached_tokens=out.num_cached_tokens,
            replica=self.replica if first else None,
            prompt_logprobs=out.prompt_logprobs,
        )

    def _record(
        self,
        req: GenerateRequest,
        arrival: float,
        num_prompt: int,
        num_out: int,
        finish_reasons: dict[int, str],
        first_token_at: float | None,
        itls: list[float],
        em: Any,
    ) -> None:
        now = time.monotonic()
        reason = finish_reasons.get(0) or next(iter(finish_reasons.values()), "abort")
        start = getattr(em, "arrival_time", None) or arrival
        ftt = getattr(em, "first_token_time", None) or first_token_at
        end = getattr(em, "finished_time", None) or now
        sched = getattr(em, "first_scheduled_time", None)
        ttft = (ftt - start) if ftt is not None else None
        queue_s = (sched - start) if sched is not None else None
        try:
            self.metrics.record_request(reason, ttft, end - start, queue_s, itls)
        except Exception:  # metrics must never fail a request
            logger.exception("rayfleet: recording request metrics failed")
        if self._log_requests:
            rec: dict[str, Any] = {
                "event": "request",
                "request_id": req.request_id,
                "model": self.model_name,
                "replica": self.replica,
                "endpoint": req.endpoint,
                "prompt_tokens": num_prompt,
                "output_tokens": num_out,
                "ttft_s": None if ttft is None else round(ttft, 6),
                "total_s": round(end - start, 6),
                "finish_reason": reason,
            }
            if req.prompt_text is not None:
                rec["prompt"] = req.prompt_text
            logger.info("rayfleet.request %s", json.dumps(rec))

    # -- introspection ----------------------------------------------------------------------

    async def model_info(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "max_model_len": int(self.engine.max_model_len),
            "eos_token_ids": list(self.engine.eos_token_ids or []),
            "replica": self.replica,
        }

    async def get_stats(self) -> dict[str, Any]:
        """The engine's stats as a dict (tests check free blocks return to their idle value)."""
        s = self.engine.get_stats()
        return {k: getattr(s, k) for k in s.__dataclass_fields__}

    async def kv_cache_contents(self) -> dict[str, Any]:
        """The block hashes this replica's engine caches now, with the KV event number they
        reflect (the router's index of this replica must match them once it has applied
        the events up to `seq`)."""
        snap = await asyncio.to_thread(self.engine.kv_snapshot)
        return {
            "replica": self.replica,
            "epoch": snap.epoch,
            "seq": snap.seq,
            "block_hashes": sorted(snap.block_hashes),
        }

    async def record_routing_stats(self) -> dict[str, Any]:
        """Load and KV events for the request router (Serve calls this every
        `request_routing_stats_period_s`; see `kv_router`).

        In a worker thread: reading the KV events waits for the engine's current step,
        which must not stall this replica's event loop (and every stream on it)."""
        async with self._routing_lock:  # one report at a time: the reporter keeps a cursor
            return await asyncio.to_thread(self._routing.report)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine died is replaced."""
        if not self.engine.is_healthy():
            raise RuntimeError(f"replica {self.replica}: engine is not healthy")

    async def _stats_loop(self) -> None:
        while True:
            try:
                self.metrics.record_stats(self.engine.get_stats())
            except Exception:
                logger.exception("rayfleet: recording engine stats failed")
            await asyncio.sleep(STATS_INTERVAL_S)

    async def __del__(self):
        if getattr(self, "_stats_task", None) is not None:
            self._stats_task.cancel()
        if getattr(self, "_channel", None) is not None:
            await self._channel.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.shutdown()
