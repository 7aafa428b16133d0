"""LLMEngine: add_request / step / abort over the scheduler, KV cache and model runner.

Synchronous and single-threaded: AsyncLLMEngine drives it from a background thread, the
offline `LLM` class in a plain loop. Input is validated before anything is queued, so bad
input raises ValueError and leaves the engine exactly as it was.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from .config import EngineConfig
from .kv_cache_manager import KVCacheManager
from .kv_events import KVEventBatch, KVSnapshot
from .model_loader import resolve_model_path
from .model_runner import ModelRunner
from .output_processor import OutputProcessor, RequestState, SampleState
from .outputs import RequestOutput
from .request import Request, RequestStatus
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict

# CPU KV budget when none is configured: a quarter of available memory, at most 4 GiB.
_CPU_KV_SHARE = 0.25
_CPU_KV_MAX = 4 << 30
# CUDA: the share of free device memory (after weights) given to the KV cache.
_CUDA_KV_SHARE = 0.85


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps: int
    # Prompt tokens not computed yet (waiting requests + unfinished prefills): the work a
    # new request queues behind. The router's cost weighs it (`queued_prefill_token`).
    queued_prefill_tokens: int = 0


@dataclass
class PreparedRequest:
    """A validated request, ready to enter the engine (built outside the engine loop)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0


def _available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.runner = ModelRunner(config, self.model_path)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_path)
        self.vocab_size = int(self.runner.hf_config.vocab_size)
        self.max_model_len = int(config.max_model_len or self.runner.max_model_len)
        self.model_name = config.served_model_name or (
            "SmolLM2-135M-Instruct"
            if config.model is None
            else os.path.basename(os.path.normpath(config.model))
        )
        num_blocks = self._num_kv_blocks()
        block_bytes = self.runner.kv_cache_bytes_per_block(config.block_size)
        num_cpu_blocks = (
            config.swap_space_bytes // block_bytes if config.preemption_mode == "swap" else 0
        )
        self.runner.allocate_kv_cache(num_blocks, num_cpu_blocks)
        self.kv = KVCacheManager(
            num_blocks,
            config.block_size,
            enable_caching=config.enable_prefix_caching,
            num_cpu_blocks=num_cpu_blocks,
            enable_kv_events=config.enable_kv_events,
        )
        self.scheduler = Scheduler(config, self.kv)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self._samples: dict[str, SampleState] = {}  # per-sample request id -> state
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._num_steps = 0
        torch.manual_seed(config.seed)
        logger.info(
            "engine ready: model=%s device=%s dtype=%s kv_blocks=%d x %d tokens, max_model_len=%d",
            self.model_path,
            self.runner.device,
            self.runner.dtype,
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    def _num_kv_blocks(self) -> int:
        c = self.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        budget = c.kv_cache_memory_bytes
        if budget is None:
            if self.runner.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.runner.device)
                budget = int(free * _CUDA_KV_SHARE)
            else:
                budget = min(_CPU_KV_MAX, int(_available_memory_bytes() * _CPU_KV_SHARE))
        n = budget // self.runner.kv_cache_bytes_per_block(c.block_size)
        if n < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} is too small for one KV block")
        return int(n)

    # ---- input -----------------------------------------------------------------------
    def prepare_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> PreparedRequest:
        """Tokenize and validate; raises ValueError naming the problem. Touches no state."""
        params = sampling_params or SamplingParams()
        params.validate()
        text: str | None = None
        if isinstance(prompt, str):
            text = prompt
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                text = prompt["prompt"]
                ids = self.tokenizer.encode(text, add_special_tokens=True)
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        else:
            ids = prompt
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"prompt token id {t!r} is outside the vocabulary [0, {self.vocab_size})"
                )
        n_prompt = len(ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n_prompt} tokens but the model's context length is "
                f"{self.max_model_len}: at most {self.max_model_len - 1} prompt tokens"
            )
        if params.max_tokens is not None and n_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = "
                f"{n_prompt + params.max_tokens} exceeds the context length {self.max_model_len}"
            )
        max_tokens = params.max_tokens or (self.max_model_len - n_prompt)
        pool_tokens = self.kv.num_total_blocks * self.kv.block_size
        if n_prompt + max_tokens > pool_tokens:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) cannot fit in the KV "
                f"cache ({pool_tokens} tokens); lower max_tokens or enlarge the cache"
            )
        if request_id in self.outputs.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        return PreparedRequest(
            request_id, text, ids, params, arrival_time or time.monotonic(), priority
        )

    def add_prepared(self, prepared: PreparedRequest) -> None:
        if prepared.request_id in self.outputs.states:
            raise ValueError(f"request id {prepared.request_id!r} is already in use")
        p = prepared.sampling_params
        n_prompt = len(prepared.prompt_token_ids)
        max_tokens = p.max_tokens or (self.max_model_len - n_prompt)
        samples = []
        for i in range(p.n):
            rid = prepared.request_id if p.n == 1 else f"{prepared.request_id}#{i}"
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.runner.device)
                gen.manual_seed((p.seed + i * 0x9E3779B97F4A7C15) % (1 << 63))
            req = Request(
                request_id=rid,
                parent_id=prepared.request_id,
                sample_index=i,
                prompt_token_ids=prepared.prompt_token_ids,
                sampling_params=p,
                eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens,
                arrival_time=prepared.arrival_time,
                priority=prepared.priority,
                generator=gen,
            )
            if i == 0 and p.prompt_logprobs is not None:
                req.prompt_logprobs = [None]
            samples.append(SampleState(req, self.outputs.make_detokenizer(req)))
        state = RequestState(
            prepared.request_id,
            prepared.prompt,
            prepared.prompt_token_ids,
            samples,
            prepared.arrival_time,
        )
        self.outputs.add(state)
        for s in samples:
            self._samples[s.request.request_id] = s
            self.scheduler.add_request(s.request)
        self._prompt_tokens_total += n_prompt * p.n

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        self.add_prepared(
            self.prepare_request(request_id, prompt, sampling_params, arrival_time, priority)
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request (all its samples) wherever it is; frees every block. Idempotent."""
        state = self.outputs.states.get(request_id)
        if state is None:
            return None
        for s in state.samples:
            if not s.request.is_finished:
                self.scheduler.finish_request(s.request, RequestStatus.FINISHED_ABORTED)
            self._samples.pop(s.request.request_id, None)
        return self.outputs.make_delta(state)

    # ---- the loop --------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and one forward pass; return the deltas it produced."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.kv.events.flush()
            return []
        result = self.runner.execute_model(sched)
        self.scheduler.update_after_step(sched)
        self._num_steps += 1
        touched: dict[str, RequestState] = {}
        for rid, (first, lps) in result.prompt_logprobs.items():
            sample = self._samples.get(rid)
            if sample is not None:
                self.outputs.add_prompt_logprobs(sample.request, first, lps)
        for s in sched.scheduled:
            if not s.samples:
                continue
            req = s.request
            sampled = result.sampled[req.request_id]
            sample = self._samples[req.request_id]
            status = self.outputs.process_token(sample, sampled.token_id, sampled.logprobs)
            self._generation_tokens_total += 1
            if status is not None:
                self.scheduler.finish_request(req, status)
                self.outputs.on_finished(sample)
                del self._samples[req.request_id]
            state = self.outputs.states.get(req.parent_id)
            if state is not None:
                touched[req.parent_id] = state
        self.kv.events.flush()
        deltas = []
        for state in touched.values():
            delta = self.outputs.make_delta(state)
            if delta is not None:
                deltas.append(delta)
        return deltas

    # ---- observability ---------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_swapped=len(self.scheduler.swapped),
            kv_cache_usage=self.kv.usage(),
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_total_blocks,
            block_size=self.kv.block_size,
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_steps=self._num_steps,
            queued_prefill_tokens=self.scheduler.num_queued_prefill_tokens,
        )

    def take_kv_events(self, after_seq: int = -1) -> list[KVEventBatch]:
        """Numbered batches above `after_seq`, including the changes made outside a step
        (`reset_prefix_cache`), so a consumer's view matches the cache when it returns."""
        self.kv.events.flush()
        return self.kv.events.take(after_seq)

    def kv_snapshot(self) -> KVSnapshot:
        return self.kv.snapshot()

    def reset_prefix_cache(self) -> bool:
        return self.kv.pool.reset_prefix_cache()
