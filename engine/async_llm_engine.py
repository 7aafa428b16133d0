"""AsyncLLMEngine: an LLMEngine stepping in a background thread, with per-request async streams.

The step loop runs in its own thread so a long forward pass never blocks the event loop
that serves HTTP. Adds and aborts are handed to that thread through a queue and applied
between steps; deltas come back to each request's asyncio.Queue. A consumer slower than
the engine gets several steps' deltas merged into one item (fewer, larger messages).

The engine is also built in that thread (`from_config`), so that it is the only thread of
the process that runs PyTorch's parallel CPU ops. With the OpenMP backend (the CPU wheels'
libgomp) every thread that starts a parallel region gets a worker pool of its own, and once
the process holds more OpenMP threads than CPUs, libgomp stops spin-waiting between
regions: each of a decode step's small ops then waits for its workers to wake from a futex.
Measured on 2 cores: a 1x576 @ 576x1536 matmul 54 us on the first thread to use OpenMP, 187
us on a second; the default model's batch-1 decode through this class 66-71 ms/token when
the caller's thread loaded it (as it did before), 37-38 ms/token now (`LLM.generate`, all on
one thread: 37-40).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .config import EngineConfig
from .kv_events import KVEventBatch, KVSnapshot
from .llm import merge_delta
from .llm_engine import EngineStats, LLMEngine, PreparedRequest, PromptType
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


class AsyncLLMEngine:
    def __init__(
        self, engine: LLMEngine | None = None, *, build: Callable[[], LLMEngine] | None = None
    ) -> None:
        """Step `engine`, or the engine `build()` returns: called in the engine thread
        (what `from_config` does; the module's docstring says why)."""
        if (engine is None) == (build is None):
            raise TypeError("AsyncLLMEngine takes exactly one of an engine and a build function")
        self.engine: LLMEngine = engine  # type: ignore[assignment]  # set by `build` if None
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        # Held by the engine thread while it changes engine state (ops + one step), so
        # other threads can read a consistent KV view (router stats) between steps.
        self._engine_lock = threading.Lock()
        self._stopped = False
        self._error: BaseException | None = None
        # Requests (and their prompt tokens) handed to the engine thread, and the part of them
        # it had applied when it took the stats snapshot: the difference is what the stats do
        # not count yet (`load_snapshot`). Each counter has one writer; a pair is one object.
        self._sent_lock = threading.Lock()
        self._sent = (0, 0)
        self._applied = (0, 0)  # the engine thread's
        self._snap: tuple[EngineStats, tuple[int, int]]
        built = threading.Event()
        build_error: list[BaseException] = []

        def run() -> None:
            try:
                if build is not None:
                    self.engine = build()
                self._snap = (self.engine.get_stats(), (0, 0))
            except BaseException as e:
                build_error.append(e)
                return
            finally:
                built.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="rayfleet-engine", daemon=True)
        self._thread.start()
        built.wait()
        if build_error:
            self._thread.join()
            raise build_error[0]

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        """Build the engine (load the model) in the engine thread and start it."""
        return cls(build=lambda: LLMEngine(config))

    # ---- properties the server uses ---------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.engine.eos_token_ids

    @property
    def block_size(self) -> int:
        return self.engine.kv.block_size

    def is_healthy(self) -> bool:
        return not self._stopped and self._error is None and self._thread.is_alive()

    def get_stats(self) -> EngineStats:
        """Counters as of the end of the last step (read without stopping the loop)."""
        return self._snap[0]

    def load_snapshot(self) -> tuple[EngineStats, int, int]:
        """`get_stats()`, plus the requests handed to `generate` that it does not count yet
        (queued for the engine thread, or added after its last step ended) and their prompt
        tokens. Every request whose `generate` started before this call is in one of the
        two: what the request router needs to know what a report covers."""
        stats, (n_applied, t_applied) = self._snap
        with self._sent_lock:
            n_sent, t_sent = self._sent
        return stats, max(0, n_sent - n_applied), max(0, t_sent - t_applied)

    def _take_snapshot(self) -> None:
        self._snap = (self.engine.get_stats(), self._applied)

    def take_kv_events(self, after_seq: int = -1) -> list[KVEventBatch]:
        """KV event batches numbered above `after_seq`, read between two engine steps."""
        with self._engine_lock:
            return self.engine.take_kv_events(after_seq)

    def kv_snapshot(self) -> KVSnapshot:
        """The set of cached block hashes, consistent with the event numbering."""
        with self._engine_lock:
            return self.engine.kv_snapshot()

    # ---- requests ------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas for one request. Raises ValueError for bad input before yielding."""
        if not self.is_healthy():
            raise EngineDeadError(f"engine is not running: {self._error!r}")
        prepared = self.engine.prepare_request(
            request_id, prompt, sampling_params, time.monotonic(), priority
        )
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        with self._sent_lock:
            self._sent = (self._sent[0] + 1, self._sent[1] + len(prepared.prompt_token_ids))
            self._ops.put(("add", prepared))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                # Merge everything already queued: a slow consumer gets fewer, larger items.
                merged = None
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    merged = merge_delta(merged, item) if merged is not None else item
                    if merged.finished or stream.queue.empty():
                        break
                    item = stream.queue.get_nowait()
                finished = merged.finished
                yield merged
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._ops.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._ops.put(("abort", request_id))
        self._wake.set()

    async def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30)

    def shutdown_sync(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(30)

    # ---- the engine thread -----------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        self._deliver_many([(request_id, item)])

    def _deliver_many(self, items: list[tuple[str, object]]) -> None:
        """Hand a step's deltas to their streams with one wake-up per event loop, not one per
        request: each `call_soon_threadsafe` wakes the loop thread, which then contends for
        the GIL with this thread's next step (64 wake-ups a step cost ~60% of decode
        throughput, measured with 64 streams on 2 cores)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        with self._streams_lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _apply_ops(self) -> None:
        while True:
            try:
                op, arg = self._ops.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                prepared: PreparedRequest = arg
                n, t = self._applied
                self._applied = (n + 1, t + len(prepared.prompt_token_ids))
                try:
                    self.engine.add_prepared(prepared)
                except ValueError as e:
                    self._deliver(prepared.request_id, e)
            elif op == "abort":
                self.engine.abort_request(arg)

    def _loop(self) -> None:
        while not self._stopped:
            with self._engine_lock:
                self._apply_ops()
                busy = self.engine.has_unfinished_requests()
            if not busy:
                self._take_snapshot()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self._engine_lock:
                    deltas = self.engine.step()
            except Exception as e:  # a bug or device failure: fail in-flight requests, keep going
                logger.exception("engine step failed; aborting in-flight requests")
                with self._engine_lock:
                    self._fail_all(e)
                continue
            self._take_snapshot()
            self._deliver_many([(d.request_id, d) for d in deltas])
        # Shutdown: end every open stream.
        self._fail_all(EngineDeadError("engine shut down"))

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            ids = list(self._streams)
        for rid in ids:
            self.engine.abort_request(rid)
            self._deliver(rid, error)
        for rid in list(self.engine.outputs.states):
            self.engine.abort_request(rid)
