"""Scheduler: continuous batching under a token budget.

Rule: every step, running requests go first (each catches up by as many tokens as the
budget allows: one for a decode, a chunk for an unfinished prefill), then waiting requests
in FIFO order, chunked to fit the budget. When blocks run out, the newest running request
is preempted (recomputed later, or swapped to CPU memory) so older ones keep going.
"""

from __future__ import annotations

import time
from collections import deque

from .config import EngineConfig
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus
from .scheduler_output import ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        # n > 1: later samples wait until the first has computed the prompt, so they
        # share its cached blocks instead of computing the same prefix again.
        self._first_sibling: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []
        self.num_preemptions = 0

    # ---- bookkeeping -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        if request.sample_index == 0:
            self._first_sibling[request.parent_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_queued_prefill_tokens(self) -> int:
        """Tokens still to prefill: a waiting request's (new, or preempted to be recomputed)
        less its leading blocks the prefix cache holds now, and the rest of a running
        request's unfinished prefill. Swapped requests keep their KV: none.

        Counting a waiting request's cached prefix as work overstated the queue on exactly
        the replica that caches a shared prefix, and the router then sent that prefix's
        next request elsewhere to recompute it."""
        n = 0
        for r in self.waiting:
            left = r.num_tokens - r.num_computed_tokens
            if r.num_computed_tokens == 0:
                left -= self.kv.num_cached_prefix_tokens(r)
            n += left
        for r in self.running:
            left = r.num_tokens - r.num_computed_tokens
            if left > 1 or r.num_computed_tokens < r.num_prompt_tokens:
                n += left  # a decode has exactly one token left, past the prompt
        return n

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Finish (or abort) a request wherever it is; every block it holds is freed."""
        if request.request_id not in self.requests:
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.swapped:
            self.swapped.remove(request)
        self.kv.free(request)
        del self.requests[request.request_id]
        if self._first_sibling.get(request.parent_id) is request:
            del self._first_sibling[request.parent_id]
        self._finished_ids.append(request.request_id)

    def _sibling_gated(self, request: Request) -> bool:
        """Samples 1.. of a request wait for sample 0's prompt: to share its cached blocks,
        and so that its prompt logprobs (sample 0 computes them) come before any sample's
        first token."""
        if request.sample_index == 0:
            return False
        first = self._first_sibling.get(request.parent_id)
        if first is None:
            return False
        if first.needs_prompt_logprobs:
            return True
        return self.kv.enable_caching and first.num_computed_tokens < first.num_prompt_tokens

    # ---- preemption ------------------------------------------------------------------
    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_ids.append(request.request_id)
        if self.config.preemption_mode == "swap" and self.kv.can_swap_out(request):
            out.blocks_to_swap_out.extend(self.kv.swap_out(request))
            request.status = RequestStatus.SWAPPED
            self.swapped.appendleft(request)
        else:
            self.kv.free(request)
            request.status = RequestStatus.WAITING
            request.num_computed_tokens = 0
            self.waiting.appendleft(request)

    # ---- the step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.monotonic()
        preempted = False

        # 1. Running requests, oldest first. Preempt from the newest end when out of blocks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while True:
                block_ids = self.kv.allocate_slots(req, num_new)
                if block_ids is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            if block_ids is None:
                break  # `req` itself was preempted; everything after it already was
            out.scheduled.append(ScheduledRequest(req, num_new, block_ids))
            budget -= num_new
            i += 1

        # 2. Swapped requests come back before any new one is admitted (FIFO fairness).
        while (
            self.swapped
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.swapped[0]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.can_swap_in(req, num_new):
                break
            self.swapped.popleft()
            out.blocks_to_swap_in.extend(self.kv.swap_in(req, num_new))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, self.kv.block_ids(req.request_id)))
            budget -= num_new

        # 3. Waiting requests in arrival order, while the budget and the blocks last. Not
        # after a preemption (it would thrash), unless the step would otherwise be empty.
        skipped: list[Request] = []
        while (
            self.waiting
            and (not preempted or not out.scheduled)
            and not self.swapped
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if self._sibling_gated(req):
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_cached = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            block_ids = self.kv.allocate_slots(req, num_new, computed_blocks)
            if block_ids is None:
                # Undo the lookup's statistics: the request was not admitted.
                self.kv.stats.queries -= req.num_tokens
                self.kv.stats.hits -= num_cached
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new, block_ids))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

        out.preempted_request_ids = self._preempted_ids
        out.finished_request_ids = self._finished_ids
        self._preempted_ids = []
        self._finished_ids = []
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled request's computed-token count (before sampling is applied)."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
