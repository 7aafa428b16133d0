"""ModelRunner: turns a SchedulerOutput into flat tensors, runs the model, samples.

One step: copy swapped blocks (swap-outs first, then swap-ins), build the step's flat
inputs once (token ids, positions, slot mapping, the attention plan from the block tables,
context lengths and query start offsets), run the model over every scheduled token, compute
logits only for the chunks that reach their request's last token, and sample those. The
runner never changes a request's state: the engine appends the sampled tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from rayfleet.kernels import cpu_kernels
from rayfleet.kernels.attention import AttentionWorkspace, PagedAttentionPlan
from rayfleet.kernels.cache import swap_blocks

from .config import EngineConfig
from .cpu_linear_tuning import PackedRowsChoice, apply_packed_rows, describe, measure_packed_rows
from .model_loader import get_model_architecture, iterate_weights, load_hf_config
from .models.attention import AttentionMetadata
from .models.llama import head_dim_of
from .request import Request
from .sampler import Sampler, TokenLogprobs, token_logprobs
from .scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)  # request id -> token
    # request id -> (first prompt position scored, its TokenLogprobs in order): entry j is
    # the logprob of prompt token `first + j`, predicted from the position before it.
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def model_context_length(hf_config) -> int:
    """The longest context the model supports (sliding-window models: the window, since the
    attention here is full attention)."""
    n = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    if n <= 0:
        raise ValueError("the model config has no max_position_embeddings")
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        n = min(n, int(window))
    return n


def _use_column_major_weights(model: torch.nn.Module) -> None:
    """Store every projection's weight column-major (the same [out, in] tensor, strides
    swapped). On the CPU, `x @ W.T` with W.T contiguous takes BLAS's no-transpose path,
    which for the few-row matmuls of decode steps is up to ~1.9x faster (measured here:
    10 rows through SmolLM2's layers 1.2 -> 0.77 ms, its LM head 25.6 -> 13.3 ms) and never
    slower. A tied LM head gets its own copy so the embedding lookup keeps row-major rows.
    """
    from .models.embedding import ParallelLMHead
    from .models.linear import _ParallelLinearBase

    for module in model.modules():
        if isinstance(module, _ParallelLinearBase | ParallelLMHead):
            w = module.weight
            module.weight = torch.nn.Parameter(w.data.t().contiguous().t(), requires_grad=False)


def _pack_weights_for_cpu(model: torch.nn.Module, which: str) -> int:
    """Give projections ("all", or only the "lm_head") a oneDNN-prepacked copy of their
    weight, which `models.linear.cpu_linear` uses for the row counts where it beats BLAS
    (which ones depends on the CPU: `cpu_linear_tuning`; on some it is slower at a few rows,
    hence a copy rather than a replacement). Returns the bytes added."""
    from .models.embedding import ParallelLMHead
    from .models.linear import _ParallelLinearBase, pack_for_cpu

    kinds = (ParallelLMHead,) if which == "lm_head" else (_ParallelLinearBase, ParallelLMHead)
    added = 0
    for module in model.modules():
        if isinstance(module, kinds):
            module.packed_weight = pack_for_cpu(module.weight)
            added += module.weight.numel() * module.weight.element_size()
    return added


# Prompt positions scored per LM-head call when prompt logprobs are asked for.
PROMPT_LOGPROBS_ROWS = 256


def _token_slice(req: Request, start: int, n: int) -> list[int]:
    """req.all_token_ids[start:start + n] without concatenating the whole list."""
    prompt = req.prompt_token_ids
    p = len(prompt)
    if start >= p:
        return req.output_token_ids[start - p : start - p + n]
    if start + n <= p:
        return prompt[start : start + n]
    return prompt[start:] + req.output_token_ids[: start + n - p]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        self.hf_config = load_hf_config(model_path)
        model_cls = get_model_architecture(self.hf_config)
        limit = model_context_length(self.hf_config)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) exceeds the model's context length ({limit})"
            )
        self.max_model_len = int(config.max_model_len or limit)

        self.tp_size = config.tensor_parallel_size
        self.tp_rank = 0
        if self.tp_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_world_size() != self.tp_size:
                raise ValueError(
                    f"tensor_parallel_size={self.tp_size} needs torch.distributed initialised "
                    f"with that world size"
                )
            self.tp_rank = dist.get_rank()

        self.model = model_cls(
            self.hf_config,
            dtype=self.dtype,
            device=self.device,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
            max_position=self.max_model_len,
        )
        self.model.load_weights(iterate_weights(model_path))
        self.model.eval()
        # The C++ CPU kernels (built on first use; RAYFLEET_CPU_KERNELS=0 turns them off).
        self.cpu_kernels = self.device.type == "cpu" and cpu_kernels.available()
        if self.device.type == "cpu":
            _use_column_major_weights(self.model)
        self.packed_weight_bytes = 0
        self.packed_rows_choice: PackedRowsChoice | None = None  # measured row tables
        if (
            config.cpu_packed_weights != "none"
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
        ):
            self.packed_weight_bytes = _pack_weights_for_cpu(self.model, config.cpu_packed_weights)
            if config.cpu_packed_rows == "measure":
                self.packed_rows_choice = measure_packed_rows(self.model)
                apply_packed_rows(self.model, self.packed_rows_choice)
                logger.info(describe(self.packed_rows_choice))
        if self.cpu_kernels and hasattr(self.model, "use_fused_cpu_kernels"):
            self.model.use_fused_cpu_kernels(True)
        self.sampler = Sampler()

        self.num_layers = int(self.hf_config.num_hidden_layers)
        self.head_dim = head_dim_of(self.hf_config)
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads  # this rank's
        self.block_size = config.block_size
        elem = torch.empty((), dtype=self.dtype).element_size()
        # Decode sequences are attended in chunks of ~4 MiB of gathered keys (cache-sized).
        self.decode_chunk_tokens = max(
            self.block_size, (4 << 20) // (self.num_kv_heads * self.head_dim * elem)
        )
        self.attn_workspace = AttentionWorkspace()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- KV cache ----------------------------------------------------------------------
    def kv_cache_bytes_per_block(self, block_size: int | None = None) -> int:
        bs = block_size or self.block_size
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * bs * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for_budget(self, budget_bytes: int) -> int:
        return int(budget_bytes // self.kv_cache_bytes_per_block())

    def allocate_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.num_layers)
        ]
        self.cpu_kv_caches = []
        if num_cpu_blocks > 0:
            cpu_shape = (num_cpu_blocks, *shape[1:])
            pin = self.device.type == "cuda"
            self.cpu_kv_caches = [
                (
                    torch.zeros(cpu_shape, dtype=self.dtype, pin_memory=pin),
                    torch.zeros(cpu_shape, dtype=self.dtype, pin_memory=pin),
                )
                for _ in range(self.num_layers)
            ]

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, cpu block) pairs: device -> CPU."""
        self._check_swap_space(pairs)
        for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_kv_caches, strict=True):
            swap_blocks(k, ck, pairs)
            swap_blocks(v, cv, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, cpu block) pairs: CPU -> device."""
        self._check_swap_space(pairs)
        flipped = [(c, d) for d, c in pairs]
        for (k, v), (ck, cv) in zip(self.kv_caches, self.cpu_kv_caches, strict=True):
            swap_blocks(ck, k, flipped)
            swap_blocks(cv, v, flipped)

    def _check_swap_space(self, pairs) -> None:
        if pairs and not self.cpu_kv_caches:
            raise ValueError("swap requested but no CPU swap blocks were allocated")

    # ---- one step ----------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if not self.kv_caches:
            raise ValueError("allocate_kv_cache() must be called before execute_model()")
        if scheduler_output.blocks_to_swap_out:
            self.swap_out(scheduler_output.blocks_to_swap_out)
        if scheduler_output.blocks_to_swap_in:
            self.swap_in(scheduler_output.blocks_to_swap_in)
        if scheduler_output.is_empty:
            return ModelRunnerOutput()

        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        context_lens: list[int] = []
        query_lens: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        # Prompt logprobs: (request, first prompt token scored, its rows in the batch).
        prompt_lp: list[tuple[Request, int, range]] = []
        for s in scheduler_output.scheduled:
            req, n, blocks = s.request, s.num_new_tokens, s.block_ids
            start = req.num_computed_tokens
            end = start + n
            if n < 1 or end > req.num_tokens:
                raise ValueError(
                    f"request {req.request_id!r}: cannot compute tokens [{start}, {end}) of "
                    f"{req.num_tokens}"
                )
            if -(-end // bs) > len(blocks):
                raise ValueError(
                    f"request {req.request_id!r}: {end} tokens need {-(-end // bs)} blocks of "
                    f"{bs}, got {len(blocks)}"
                )
            if end > self.max_model_len:
                raise ValueError(
                    f"request {req.request_id!r}: {end} tokens exceed max_model_len "
                    f"{self.max_model_len}"
                )
            if req.needs_prompt_logprobs:
                # Position p predicts prompt token p + 1: score the tokens not yet scored
                # (a recompute after preemption runs positions already done).
                first = max(len(req.prompt_logprobs), start + 1)
                last = min(end, req.num_prompt_tokens - 1)  # last scored token's position
                if first <= last:
                    row0 = len(input_ids) - start
                    prompt_lp.append((req, first, range(row0 + first - 1, row0 + last)))
            input_ids.extend(_token_slice(req, start, n))
            if n == 1:
                positions.append(start)
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                rng = range(start, end)
                positions.extend(rng)
                slots.extend(blocks[p // bs] * bs + p % bs for p in rng)
            tables.append(blocks)
            context_lens.append(end)
            query_lens.append(n)
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(req)

        dev = self.device
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True)
        slot_t = torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True)
        plan = PagedAttentionPlan.build(
            tables,
            context_lens,
            query_lens,
            bs,
            dev,
            workspace=self.attn_workspace,
            decode_chunk_tokens=self.decode_chunk_tokens,
            use_cpu_kernel=self.cpu_kernels,
        )
        meta = AttentionMetadata(slot_mapping=slot_t, plan=plan, positions=pos_t)

        hidden = self.model(ids_t, pos_t, self.kv_caches, meta)
        scored = self._prompt_logprobs(hidden, prompt_lp) if prompt_lp else {}
        if not sample_rows:
            return ModelRunnerOutput(prompt_logprobs=scored)
        if len(sample_rows) == hidden.shape[0]:
            picked = hidden
        else:
            picked = hidden[torch.tensor(sample_rows, dtype=torch.long, device=dev)]
        logits = self.model.compute_logits(picked)
        out = self.sampler(logits, sample_reqs)
        return ModelRunnerOutput(
            sampled={
                r.request_id: SampledToken(tok, lp)
                for r, tok, lp in zip(sample_reqs, out.token_ids, out.logprobs, strict=True)
            },
            prompt_logprobs=scored,
        )

    def _prompt_logprobs(
        self, hidden: torch.Tensor, wanted: list[tuple[Request, int, range]]
    ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """Logprobs of prompt tokens from the hidden states of the positions before them
        (the LM head runs on those rows too; raw log-softmax, as for sampled tokens)."""
        rows = [r for _, _, rr in wanted for r in rr]
        targets = [
            t for req, first, rr in wanted for t in req.prompt_token_ids[first : first + len(rr)]
        ]
        ks = [req.sampling_params.prompt_logprobs or 0 for req, _, rr in wanted for _ in rr]
        # In slices of rows: a whole 2048-token chunk's float32 logits over a 128k vocabulary
        # (and their log-softmax) would be 2 GB at once.
        got: list[TokenLogprobs] = []
        for a in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            idx = torch.tensor(rows[a : a + PROMPT_LOGPROBS_ROWS], device=hidden.device)
            raw = torch.log_softmax(self.model.compute_logits(hidden[idx]).float(), dim=-1)
            tgt = torch.tensor(targets[a : a + PROMPT_LOGPROBS_ROWS], device=hidden.device)
            got += token_logprobs(raw, tgt, ks[a : a + PROMPT_LOGPROBS_ROWS])
        out, i = {}, 0
        for req, first, rr in wanted:
            out[req.request_id] = (first, got[i : i + len(rr)])
            i += len(rr)
        return out
